"""A sweep's results from its folder: ``results.csv`` (one row per run) and ``summary.md``
(mean +- spread per combination and evaluation set, a plot).

Both are built from what the run folders hold (``result.json`` / ``error.json``), never from
memory, so ``maskteacher sweep collect DIR`` after the slices of a job array writes exactly
what one process running every run writes. Rows follow ``sweep.json``'s order (combinations as
first asked, seeds innermost). Spread: the sample standard deviation over the seeds (n - 1 in
the denominator; 0 for one seed). Timings are in ``results.csv`` only: they differ from run to
run, the summary's figures do not.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskteacher.sweep.runner import ERROR, RESULT
from maskteacher.sweep.spec import read_sweep_file

#: summary columns: metric key -> header (``ms_per_image`` is timing: results.csv only)
METRICS = {
    "mean_best_iou": "mean best IoU",
    "boundary_iou": "boundary IoU",
    "ar10": "AR@10",
    "ar100": "AR@100",
    "masks_per_image": "masks/img",
    "teacher_agreement": "teacher agreement",
}
CSV_METRICS = (*METRICS, "ms_per_image")


@dataclass
class RunRecord:
    """One run folder's outcome; ``data`` is its result.json (finished) or error.json."""

    combination: str
    seed: int
    folder: str  # relative to the sweep folder
    status: str  # "finished" | "failed"
    data: dict[str, Any] = field(default_factory=dict)

    def metric(self, eval_name: str, key: str) -> float | None:
        value = self.data.get("metrics", {}).get(eval_name, {}).get(key)
        return None if value is None else float(value)


@dataclass
class SweepResults:
    """Every run found in a sweep folder, in the sweep's order, and what was asked for."""

    out: Path
    header: dict[str, Any]
    records: list[RunRecord]
    missing: list[tuple[str, int]]  # asked for, neither finished nor failed

    @property
    def evals(self) -> dict[str, str]:
        return self.header["evals"]

    def finished(self, combination: str | None = None) -> list[RunRecord]:
        return [
            r
            for r in self.records
            if r.status == "finished" and combination in (None, r.combination)
        ]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_results(out: str | os.PathLike[str]) -> SweepResults:
    """Read ``sweep.json`` and every run folder of the sweep at ``out``."""
    out = Path(out)
    header = read_sweep_file(out)
    order = {c["name"]: k for k, c in enumerate(header["combinations"])}
    seed_order = {s: k for k, s in enumerate(header["seeds"])}
    records = []
    for folder in sorted((out / "runs").glob("*/seed_*")):
        for name, status in ((RESULT, "finished"), (ERROR, "failed")):
            data = _read(folder / name)
            if data is not None:
                rel = str(folder.relative_to(out))
                records.append(RunRecord(data["combination"], int(data["seed"]), rel, status, data))
                break
    records.sort(
        key=lambda r: (
            order.get(r.combination, len(order)),
            r.combination,
            seed_order.get(r.seed, len(seed_order)),
            r.seed,
        )
    )
    found = {(r.combination, r.seed) for r in records}
    missing = [
        (c["name"], s)
        for c in header["combinations"]
        for s in header["seeds"]
        if (c["name"], s) not in found
    ]
    return SweepResults(out, header, records, missing)


def mean_spread(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample standard deviation, n) of the values that are not None/NaN; None if none."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), spread, len(xs)


def format_mean_spread(stats: tuple[float, float, int] | None, digits: int = 3) -> str:
    if stats is None:
        return "-"
    mean, spread, n = stats
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def combinations_of(results: SweepResults) -> list[str]:
    """Combination names in table order (those with at least one run folder)."""
    names: list[str] = []
    for r in results.records:
        if r.combination not in names:
            names.append(r.combination)
    return names


def summary_table(
    results: SweepResults,
    eval_name: str,
    metrics: dict[str, str] = METRICS,
    label: str = "combination",
) -> list[str]:
    """Markdown rows: one per combination, mean +- spread of every metric over its seeds."""
    lines = [
        f"| {label} | runs | " + " | ".join(metrics.values()) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name in combinations_of(results):
        runs = results.finished(name)
        cells = [
            format_mean_spread(mean_spread([r.metric(eval_name, key) for r in runs]))
            for key in metrics
        ]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def write_results_csv(results: SweepResults) -> Path:
    """``results.csv``: one row per run folder (finished or failed), atomically."""
    keys: list[str] = []
    for r in results.records:
        for key, _ in r.data.get("overrides", []):
            if key not in keys:
                keys.append(key)
    metric_cols = [f"{e}/{m}" for e in results.evals for m in CSV_METRICS]
    fields = ["combination", *keys, "seed", "status", *metric_cols]
    fields += ["train_seconds", "eval_seconds", "wall_seconds", "run", "error"]
    path = results.out / "results.csv"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in results.records:
            row: dict[str, Any] = {"combination": r.combination, "seed": r.seed}
            row.update({k: v for k, v in r.data.get("overrides", [])})
            row.update({"status": r.status, "run": r.folder, "error": r.data.get("error", "")})
            for e in results.evals:
                for m in CSV_METRICS:
                    value = r.metric(e, m)
                    row[f"{e}/{m}"] = "" if value is None else f"{value:.6g}"
            for t in ("train_seconds", "eval_seconds", "wall_seconds"):
                row[t] = f"{r.data[t]:.2f}" if t in r.data else ""
            writer.writerow(row)
    tmp.replace(path)
    return path
