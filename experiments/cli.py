"""The command-line skeleton shared by the one-command experiments (experiments.chang, experiments.xia; experiments.liu and
experiments.aioli have their own, with sweep options)."""

from __future__ import annotations

import argparse
import os
import sys

from lib import errors


def main(name: str, doc: str, scales, run, argv=None, publish=("report.md",)) -> int:
  """`python -m experiments.<name> --out=DIR [--scale=...] [--data_dir=...] [--publish=RESULTS]`: calls
  run(out, scale, data_dir), prints the report's path; a LmtraceError is one line on stderr and exit code 2.
  `--publish` copies the report (without its figure links: the figures stay in DIR) and the small tables
  named in `publish` into RESULTS (e.g. experiments/results/<paper>/), the copy kept in the repo."""
  p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--scale", default="quick", choices=list(scales))
  p.add_argument("--data_dir", default="", help="TFDS data dir (default: $LMTRACE_DATA_DIR or ~/.cache/lmtrace/tfds)")
  p.add_argument("--publish", default="", help="also copy the report and its small tables into this folder")
  a = p.parse_args(argv)
  from lib import metrics as MX

  MX.quiet_logs()
  try:
    run(a.out, a.scale, a.data_dir)
  except errors.LmtraceError as e:
    print(f"lmtrace {name}: error: {e}", file=sys.stderr)
    return 2
  print(f"report: {os.path.join(a.out, 'report.md')}")
  if a.publish:
    print(f"published: {publish_results(a.out, a.publish, publish)}")
  return 0


def publish_results(out: str, dest: str, files) -> str:
  """Copies `files` from `out` into `dest`; report.md loses its Figures section (the PNGs are not copied)."""
  import shutil

  os.makedirs(dest, exist_ok=True)
  for f in files:
    src = os.path.join(out, f)
    if f == "report.md":
      with open(src) as fh:
        text = fh.read()
      text = text.split("\n## Figures\n")[0].rstrip("\n") + "\n"
      with open(os.path.join(dest, f), "w") as fh:
        fh.write(text)
    else:
      shutil.copyfile(src, os.path.join(dest, f))
  return dest


def md_table(df, cols) -> list[str]:
  """Markdown lines of `df[cols]`: floats to 4 significant digits, the rest as str."""
  lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
  for _, row in df[cols].iterrows():
    lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
  return lines


def write_report(out: str, lines: list[str], figs, scale: str) -> str:
  """`lines`, a Figures section linking `figs` and (at scale nano) the smoke-test caveat, as DIR/report.md."""
  lines = lines + ["", "## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figs]
  if scale == "nano":
    lines += ["", "Scale `nano` is a smoke test (60 steps): the numbers above show the pipeline works, not the findings."]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(text)
  return text
