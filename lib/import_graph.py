"""The import graph of lmtrace's packages, and its cycles (there must be none).

  python -m lib.import_graph                 # prints each cycle and layer violation; exit 1 if any
  python -m lib.import_graph --edges         # also prints every edge

Every `import` / `from ... import` statement counts, including those inside functions (a lazy
import only hides a cycle from the interpreter, not from the reader). `from pkg import name` is an
edge to the module `pkg.name` when that is a module, else to `pkg` itself.

Layers, lowest first (a module imports only its own layer and the layers below it):
  lib          reusable pieces: model, sharding, steps, checkpoints, mixing controllers, ...
  configs      run cards: the config schema (configs/base.py) and presets, built on lib's model presets
  data         languages, sources and the input pipeline (they read a config's data section, not configs/)
  analysis     jobs over workdirs; never the trainer
  entry points train.py, train_group.py and the trainer.py they share (whose hooks call analysis's
               in-training probes), and
               lib.hf_import, which writes a whole workdir (checkpoints and a full run card from
               configs/base.py) as the trainer does: an entry point that lives in lib/ beside the model
               code its converter shares
  experiments  studies over many runs; nothing imports them
A name is a package, a top-level module (train) or a module (lib.hf_import); the longest matching
dotted prefix decides a module's layer.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

# packages and top-level modules
PACKAGES = ("lib", "configs", "data", "analysis", "experiments", "train", "train_group", "trainer")
# Layers, lowest first: a module may import its own layer and the layers below it, never above.
ENTRY_POINTS = ("train", "train_group", "trainer", "lib.hf_import")
LAYERS = (("lib",), ("configs",), ("data",), ("analysis",), ENTRY_POINTS, ("experiments",))


def modules(root: str, packages=PACKAGES) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under the packages, or of the top-level module
  `<name>.py` (missing ones skipped)."""
  out = {}
  for pkg in packages:
    if os.path.isfile(os.path.join(root, f"{pkg}.py")):
      out[pkg] = os.path.join(root, f"{pkg}.py")
      continue
    for dirpath, dirnames, files in os.walk(os.path.join(root, pkg)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
      for f in sorted(files):
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), root)[: -len(".py")]
          parts = rel.split(os.sep)
          if parts[-1] == "__init__":
            parts = parts[:-1]
          out[".".join(parts)] = os.path.join(dirpath, f)
  return out


def _targets(node: ast.AST, here: str, is_pkg: bool, known: set[str]) -> list[str]:
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
      pkg = here.split(".") if is_pkg else here.split(".")[:-1]
      pkg = pkg[: len(pkg) - (node.level - 1)]
      base = ".".join(pkg + ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
  out = []
  for n in names:
    while n and n not in known:  # `import data.pipeline.x` -> the longest known prefix
      n = n.rpartition(".")[0]
    if n:
      out.append(n)
  return out


def graph(root: str = ".", packages=PACKAGES) -> dict[str, set[str]]:
  """{module: modules of these packages it imports anywhere in its body} (self-imports dropped)."""
  mods = modules(root, packages)
  known = set(mods)
  g = {}
  for name, path in mods.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        deps.update(_targets(node, name, is_pkg, known))
    deps.discard(name)
    g[name] = deps
  return g


def _components(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module, each sorted, sorted by their first module
  (scipy's csgraph rather than a hand-written Tarjan)."""
  from scipy.sparse import csr_matrix
  from scipy.sparse.csgraph import connected_components

  names = sorted(set(g) | {w for ws in g.values() for w in ws})
  at = {n: i for i, n in enumerate(names)}
  rows = [at[u] for u in names for _ in g.get(u, ())]
  cols = [at[w] for u in names for w in sorted(g.get(u, ()))]
  adj = csr_matrix(([1] * len(rows), (rows, cols)), shape=(len(names), len(names)))
  _, label = connected_components(adj, directed=True, connection="strong")
  comps: dict[int, list[str]] = {}
  for n, lab in zip(names, label):
    comps.setdefault(int(lab), []).append(n)
  return sorted(c for c in comps.values() if len(c) > 1)


def _shortest_cycle(g: dict[str, set[str]], members: set[str], start: str) -> list[str]:
  """[start, ..., start]: a shortest cycle through `start` inside its component (BFS back to start)."""
  prev, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for u in frontier:
      for w in sorted(g.get(u, set()) & members):
        if w == start:
          path = [start]
          while u != start:
            path.insert(1, u)
            u = prev[u]
          return path + [start]
        if w not in prev:
          prev[w] = u
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component of more than one module, as a path [a, b, ..., a]
  through the component's first module; components sorted by their first module."""
  return [_shortest_cycle(g, set(comp), comp[0]) for comp in _components(g)]


def layer_of(module: str, layers=LAYERS) -> int:
  """The index of `module`'s layer: its longest dotted prefix named in `layers` (-1: none)."""
  rank = {name: i for i, names in enumerate(layers) for name in names}
  parts = module.split(".")
  for k in range(len(parts), 0, -1):
    if ".".join(parts[:k]) in rank:
      return rank[".".join(parts[:k])]
  return -1


def layer_violations(g: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """'a -> b' for every import of a module from a higher layer (e.g. lib importing data)."""
  return [f"{a} -> {b}" for a in sorted(g) for b in sorted(g[a]) if layer_of(b, layers) > layer_of(a, layers) >= 0]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", default=".")
  ap.add_argument("--edges", action="store_true")
  args = ap.parse_args(argv)
  g = graph(args.root)
  if args.edges:
    for m in sorted(g):
      print(f"{m} -> {', '.join(sorted(g[m])) or '(none)'}")
  cyc, bad = cycles(g), layer_violations(g)
  for c in cyc:
    print("import cycle: " + " -> ".join(c))
  for e in bad:
    print(f"layer violation ({' < '.join('/'.join(names) for names in LAYERS)}): {e}")
  print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {len(cyc)} cycle(s), {len(bad)} layer violation(s)")
  return 1 if cyc or bad else 0


if __name__ == "__main__":
  sys.exit(main())
