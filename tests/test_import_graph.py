"""Module boundaries: no import cycles among lib/, configs/, data/, analysis/, experiments/, train.py,
train_group.py and trainer.py (function-level imports included), and no import from a higher layer
(lib < configs < data < analysis < train, train_group, trainer, lib.hf_import < experiments)."""

import os
import textwrap

from lib import import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles():
  cyc = import_graph.cycles(import_graph.graph(ROOT))
  assert cyc == [], f"import cycles: {cyc}"


def test_no_import_from_a_higher_layer():
  g = import_graph.graph(ROOT)
  assert import_graph.layer_violations(g) == []
  assert not any(d.startswith("data") for d in g["lib.mixture"])
  assert g["data.hmm"] == {"data.estimates"}  # not pcfg's private helpers
  assert {"configs.base", "configs.pcfg", "train", "train_group", "trainer"} <= set(g)  # run cards and the trainer too
  assert "analysis.probes" in g["trainer"] and "configs.base" in g["lib.hf_import"]  # the probe hook's edge is seen
  assert "trainer" in g["train"] and "trainer" in g["train_group"] and "train" not in g["train_group"]
  L = import_graph.layer_of
  assert L("lib.model") < L("configs.base") < L("data.pipeline") < L("analysis.probes") < L("train") < L("experiments.liu")
  assert L("lib.hf_import") == L("train") == L("train_group") == L("trainer")  # an entry point that writes whole workdirs


def test_checker_covers_configs_and_entry_points(tmp_path):
  _tree(
    tmp_path,
    {
      "lib/__init__.py": "",
      "lib/model.py": "",
      "lib/opt.py": "from configs import base\n",  # lib below configs
      "lib/hf_import.py": "from configs import base\n",  # the importer writes a full run card: allowed
      "configs/__init__.py": "",
      "configs/base.py": "from lib import model\n",
      "configs/pcfg.py": "from configs import base\nfrom data import pipeline\n",  # run cards never import data
      "data/__init__.py": "",
      "data/pipeline.py": "",
      "analysis/__init__.py": "",
      "analysis/probes.py": "def hook():\n  import train\n",  # analysis never imports the trainer
      "train.py": "from analysis import probes\nimport train_group\n",
      "train_group.py": "from lib import model\ndef f():\n  from experiments import x\n",
      "experiments/__init__.py": "",
      "experiments/x.py": "import train\n",
    },
  )
  g = import_graph.graph(str(tmp_path))
  assert g["train"] == {"analysis.probes", "train_group"} and g["experiments.x"] == {"train"}
  assert import_graph.layer_violations(g) == [
    "analysis.probes -> train",
    "configs.pcfg -> data.pipeline",
    "lib.opt -> configs.base",
    "train_group -> experiments.x",
  ]
  assert import_graph.cycles(g) == [["analysis.probes", "train", "analysis.probes"]]


def _tree(root, files):
  for rel, src in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(textwrap.dedent(src))


def test_checker_finds_lazy_relative_and_layer_imports(tmp_path):
  _tree(
    tmp_path,
    {
      "data/__init__.py": "",
      "data/a.py": "from data import b\n",
      "data/b.py": "def f():\n  from . import c\n",  # function-level, relative
      "data/c.py": "import data.a\nimport numpy\n",
      "data/d.py": "from data.a import something\n",
      "lib/__init__.py": "",
      "lib/m.py": "def g():\n  from data.d import x\n",
    },
  )
  g = import_graph.graph(str(tmp_path))
  assert g["data.b"] == {"data.c"} and g["data.c"] == {"data.a"} and g["data.d"] == {"data.a"}
  assert import_graph.cycles(g) == [["data.a", "data.b", "data.c", "data.a"]]
  assert import_graph.layer_violations(g) == ["lib.m -> data.d"]
  assert import_graph.main(["--root", str(tmp_path)]) == 1


def test_cycles_one_shortest_per_component():
  """Two components (one with a chord making a shorter cycle through its first module), an acyclic tail."""
  g = {
    "a": {"b"},
    "b": {"c", "a2"},
    "c": {"d", "a"},  # a -> b -> c -> a is shorter than a -> b -> c -> d -> a
    "d": {"a"},
    "x": {"y"},
    "y": {"x", "z"},
    "z": set(),
  }
  assert import_graph.cycles(g) == [["a", "b", "c", "a"], ["x", "y", "x"]]
  assert import_graph.cycles({"a": {"b"}, "b": set()}) == []
