"""experiments/cli.py: the shared CLI skeleton of experiments.chang and experiments.xia (fast, no training)."""

import pytest

from experiments import chang, xia
from lib import errors


@pytest.mark.parametrize("mod", [chang, xia])
def test_cli_calls_run_and_reports_errors_in_one_line(mod, monkeypatch, tmp_path, capsys):
  calls = []
  monkeypatch.setattr(mod, "run", lambda out, scale, data_dir: calls.append((out, scale, data_dir)))
  assert mod.main(["--out", str(tmp_path), "--scale=nano", "--data_dir=/d"]) == 0
  assert calls == [(str(tmp_path), "nano", "/d")] and f"report: {tmp_path}/report.md" in capsys.readouterr().out
  assert mod.main(["--out", str(tmp_path)]) == 0 and calls[-1][1] == "quick"  # the default scale

  def bad(out, scale, data_dir):
    raise errors.DataError("no such corpus")

  monkeypatch.setattr(mod, "run", bad)
  assert mod.main(["--out", str(tmp_path), "--scale=nano"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"lmtrace {mod.__name__.split('.')[-1]}: error: no such corpus"]
  with pytest.raises(SystemExit):
    mod.main(["--out", str(tmp_path), "--scale=huge"])
