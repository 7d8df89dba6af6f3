"""The project's own errors: one base class, one subclass per concern.

CLIs catch exactly `LmtraceError` and print its message as one line; anything else is a genuine bug
and keeps its traceback. Library code raises the most specific subclass that names the problem.
"""


class LmtraceError(Exception):
  """Base of every error that means "bad input or state", not "bug"."""


class ConfigError(LmtraceError, ValueError):
  """A run card, override or settings object that cannot be used as given."""


class DataError(LmtraceError, ValueError):
  """A data source, split or batch that cannot be built or read."""


class CheckpointError(LmtraceError, ValueError):
  """A workdir or checkpoint that is missing, damaged or belongs to another run."""


class ShardingError(LmtraceError, ValueError):
  """A mesh that cannot be built or does not divide the data or the devices."""


class TrainingDiverged(LmtraceError, RuntimeError):
  """A non-finite loss; earlier checkpoints remain readable."""


class AnalysisError(LmtraceError, ValueError):
  """An analysis job asked for something its workdir cannot provide."""
