"""lmtrace analysis jobs over workdirs. The loaders are re-exported here for notebooks
(`from analysis import load_flatness`); they are imported on first use, so `import analysis`
stays cheap."""

_LOADERS = (
  "load_flatness",
  "load_metrics",
  "load_trajectories",
  "load_token_metrics",
  "load_probes",
  "load_index",
  "load_invalid",
)
_ELSEWHERE = {"load_downstream": "analysis.downstream"}  # loaders kept beside their job
__all__ = list(_LOADERS) + list(_ELSEWHERE)


_OTHER = {"load_icl": "icl", "load_generations": "generate"}  # loaders living next to their jobs
__all__ += list(_OTHER)


def __getattr__(name):
  if name in _OTHER:
    import importlib

    return getattr(importlib.import_module(f"analysis.{_OTHER[name]}"), name)
  if name in _LOADERS:
    from analysis import load

    return getattr(load, name)
  if name == "load_sweep":  # a sweep directory (experiments/sweep.py) as one DataFrame
    from analysis.sweeps import load_sweep

    return load_sweep
  if name in _ELSEWHERE:
    import importlib

    return getattr(importlib.import_module(_ELSEWHERE[name]), name)
  raise AttributeError(f"module 'analysis' has no attribute {name!r}")
