"""Module boundaries: no import cycles among lib/, data/, analysis/, experiments/ (function-level
imports included), and no import from a higher layer (lib < data < analysis < experiments)."""

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
