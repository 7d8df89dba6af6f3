"""Studies over many runs: `sweep` (a grid of runs as one object) and one module per paper (liu, chang,
xia, aioli; aioli_fidelity measures the Aioli paper's fidelity on a checkpoint).

Nothing below this package imports it; it calls train.py's `train_and_evaluate` and the analysis CLIs.
"""
