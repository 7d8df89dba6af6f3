"""Studies over many runs: `sweep` (a grid of runs as one object) and one module per paper (chang, xia).

Nothing below this package imports it; it calls train.py's `train_and_evaluate` and the analysis CLIs.
"""
