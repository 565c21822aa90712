"""``maskteacher sweep``: repeated fine-tuning from one cache -- a grid of config overrides x
seeds, each run trained and evaluated, the results in one folder.

Layers, bottom to top: :mod:`.grid` (combinations, runs, job-array slices), :mod:`.spec` (the
sweep's definition and ``sweep.json``), :mod:`.runner` (train + evaluate one run, skip finished,
record failures), :mod:`.results` (read the run folders, ``results.csv``, mean +- spread) and
:mod:`.summary` (``summary.md``, the plot: :func:`collect`). The scheduling of many slices is
a job array's (``--index I --count N``); this package never starts processes.
"""

from maskteacher.sweep.grid import Combination, RunSpec, expand, parse_grid, parse_variants
from maskteacher.sweep.runner import run_sweep
from maskteacher.sweep.spec import Sweep
from maskteacher.sweep.summary import collect

__all__ = [
    "Combination",
    "RunSpec",
    "Sweep",
    "collect",
    "expand",
    "parse_grid",
    "parse_variants",
    "run_sweep",
]
