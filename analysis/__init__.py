"""lmtrace analysis jobs over workdirs. Every loader is re-exported here for notebooks
(`from analysis import load_flatness`); each is imported on first use, so `import analysis` stays cheap."""

import importlib

LOADERS = {  # name -> the module that defines it
  "load_flatness": "analysis.load",
  "load_metrics": "analysis.load",
  "load_trajectories": "analysis.load",
  "load_token_metrics": "analysis.load",
  "load_probes": "analysis.load",
  "load_index": "analysis.load",
  "load_invalid": "analysis.load",
  "load_downstream": "analysis.downstream",
  "load_icl": "analysis.icl",
  "load_generations": "analysis.generate",
  "load_sweep": "analysis.sweeps",  # a sweep directory (experiments/sweep.py) as one DataFrame
}
__all__ = list(LOADERS)


def __getattr__(name):
  if name in LOADERS:
    return getattr(importlib.import_module(LOADERS[name]), name)
  raise AttributeError(f"module 'analysis' has no attribute {name!r}")
