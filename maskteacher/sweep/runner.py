"""Running a sweep's runs: train (:func:`maskteacher.train.train`), then evaluate the exported
student on every evaluation set (:func:`maskteacher.eval.run.evaluate_checkpoint`).

A run is *finished* when its folder holds ``result.json`` (written atomically after the last
evaluation); re-running a sweep skips finished runs. A run that raises is recorded in
``error.json`` (the one-line error and the traceback) and the sweep goes on with the next run;
running the sweep again retries it. Training uses ``train.resume: true``, so a run killed midway
(a pre-empted job) continues from its ``last.pt``. Each run uses ``threads`` torch threads:
on a CPU the thread count changes the order of floating-point sums, so a fixed count gives the
same figures on every run of the same command on the same kind of machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskteacher.errors import UserError
from maskteacher.sweep.grid import RunSpec
from maskteacher.sweep.spec import Sweep, write_json_atomic

log = logging.getLogger(__name__)

RESULT = "result.json"
ERROR = "error.json"


@dataclass
class SweepRunSummary:
    """What one invocation did: run numbers finished now, skipped (already finished), failed."""

    finished: list[int]
    skipped: list[int]
    failed: list[int]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (None: leave torch's setting)."""
    import torch

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _plain(value: Any) -> Any:
    """JSON-ready: NaN -> None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def is_finished(sweep: Sweep, run: RunSpec) -> bool:
    """True when the run's ``result.json`` exists and belongs to this combination and seed."""
    path = sweep.run_dir(run) / RESULT
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    same = data.get("overrides") == [list(p) for p in run.combination.overrides]
    if not same or data.get("seed") != run.seed:
        raise UserError(
            f"{path} belongs to another run ({data.get('combination')!r}, seed "
            f"{data.get('seed')}); use another --out"
        )
    return True


def _train_and_evaluate(sweep: Sweep, run: RunSpec) -> dict[str, Any]:
    from maskteacher.eval.run import evaluate_checkpoint
    from maskteacher.train import train

    folder = sweep.run_dir(run)
    start = time.perf_counter()
    result = train(sweep.run_config(run))
    train_seconds = time.perf_counter() - start
    if result.export_path is None or not Path(result.export_path).is_file():
        raise RuntimeError(f"training finished without exporting the student to {folder}")
    metrics = {}
    for name in sweep.evals:
        summary = evaluate_checkpoint(
            sweep.eval_config(run, name),
            result.export_path,
            folder / "eval" / name,
            overlays=sweep.overlays,
        ).summary()
        metrics[name] = {k: _plain(v) for k, v in summary.items()}
    return {
        "combination": run.combination.name,
        "overrides": [list(p) for p in run.combination.overrides],
        "seed": run.seed,
        "metrics": metrics,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "losses": [_plain(v) for v in result.losses],
        "val_scores": [[e, _plain(v)] for e, v in result.val_scores],
        "export": str(Path(result.export_path).relative_to(folder)),
    }


def run_one(sweep: Sweep, run: RunSpec) -> bool:
    """Train and evaluate one run into its folder; True when it finished, False when it failed
    (recorded in ``error.json``). KeyboardInterrupt is not caught."""
    folder = sweep.run_dir(run)
    start = time.perf_counter()
    try:
        with torch_threads(sweep.threads):
            record = _train_and_evaluate(sweep, run)
    except Exception as exc:  # noqa: BLE001 -- any failure of one run is recorded, not fatal
        first = (str(exc).strip().splitlines() or [""])[0]
        message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        log.error("sweep run %s failed: %s", run.folder, message)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            folder / ERROR,
            {
                "combination": run.combination.name,
                "overrides": [list(p) for p in run.combination.overrides],
                "seed": run.seed,
                "error": message,
                "traceback": traceback.format_exc(),
            },
        )
        return False
    record["wall_seconds"] = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RESULT, record)
    (folder / ERROR).unlink(missing_ok=True)
    return True


def run_sweep(sweep: Sweep, runs: list[RunSpec] | None = None) -> SweepRunSummary:
    """Run ``runs`` (default: all of the sweep) one after the other, skipping finished ones."""
    sweep.record()
    todo = sweep.runs() if runs is None else runs
    summary = SweepRunSummary([], [], [])
    for position, run in enumerate(todo, start=1):
        if is_finished(sweep, run):
            summary.skipped.append(run.number)
            log.info("sweep: %s finished earlier, skipped", run.folder)
            continue
        log.info(
            "sweep: run %d/%d (#%d) %s seed %d",
            position,
            len(todo),
            run.number,
            run.combination.name,
            run.seed,
        )
        (summary.finished if run_one(sweep, run) else summary.failed).append(run.number)
    return summary
