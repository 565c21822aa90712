"""Reading the demo's result back from what the runs wrote: the sweep's results and each
run's TensorBoard log, turned into the report's "reading" paragraphs.

A difference between two methods counts as *larger than the spreads* when it exceeds the sum
of the two sample standard deviations over the seeds -- a rough rule for 3 seeds, stated in the
report, not a significance test.
"""

from __future__ import annotations

import logging
from pathlib import Path

from maskteacher.sweep.results import SweepResults, mean_spread

#: TensorBoard tags read per run (missing ones are skipped: e.g. ``soft`` exists for dual only)
LOG_TAGS = (
    "train/task_loss",
    "train/soft",
    "train/teacher_pairs",
    "train/replaced",
    "train/matched_per_image",
    "train/matched_iou",
)
BASELINE = "gt_only"
Stats = tuple[float, float, int]
Phases = tuple[float, float]  # (first quarter, last quarter) of a run


def scalar_phases(run: Path, tags: tuple[str, ...] = LOG_TAGS) -> dict[str, Phases]:
    """Each TensorBoard scalar's mean over the first and over the last quarter of the run's
    logged windows (at least one window each): how training started and how it ended."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per file read
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in present:
            values = [e.value for e in acc.Scalars(tag)]
            q = max(1, len(values) // 4)
            out[tag] = (sum(values[:q]) / q, sum(values[-q:]) / q)
    return out


def method_logs(results: SweepResults, methods: list[str]) -> dict[str, dict[str, Phases]]:
    """method -> tag -> (first, last) quarter means, averaged over the method's finished runs."""
    logs: dict[str, dict[str, Phases]] = {}
    for method in methods:
        per_run = [scalar_phases(results.out / r.folder) for r in results.finished(method)]
        logs[method] = {}
        for tag in sorted({t for phases in per_run for t in phases}):
            have = [phases[tag] for phases in per_run if tag in phases]
            logs[method][tag] = tuple(sum(v[k] for v in have) / len(have) for k in (0, 1))
    return logs


def stats(results: SweepResults, method: str, eval_name: str, metric: str) -> Stats | None:
    return mean_spread([r.metric(eval_name, metric) for r in results.finished(method)])


def compare(a: Stats | None, b: Stats | None) -> tuple[float, bool] | None:
    """(a - b, whether the difference is larger than the two spreads together)."""
    if a is None or b is None:
        return None
    delta = a[0] - b[0]
    return delta, abs(delta) > a[1] + b[1]


def _versus(results: SweepResults, method: str, eval_name: str, metric: str) -> str:
    mine = stats(results, method, eval_name, metric)
    cmp = compare(mine, stats(results, BASELINE, eval_name, metric))
    if mine is None or cmp is None:
        return f"{method} -"
    verdict = "larger than the spreads" if cmp[1] else "within the spreads"
    return f"{method} {mine[0]:.3f} ({cmp[0]:+.3f}, {verdict})"


def _spec_claim(results: SweepResults, method: str) -> str:
    """Does dual supervision give better boundaries without losing recall, here?"""
    boundary = compare(
        stats(results, method, "fine", "boundary_iou"),
        stats(results, BASELINE, "fine", "boundary_iou"),
    )
    recall = compare(
        stats(results, method, "fine", "ar100"), stats(results, BASELINE, "fine", "ar100")
    )
    if recall is None:
        return f"{method}: not measured"
    if boundary is None:  # no prediction matched a ground-truth object at IoU >= 0.5
        lost = recall[1] and recall[0] < 0
        verdict = "does not hold" if lost else "cannot be told"
        return f"{method}: no boundary IoU (no mask matched), AR@100 {recall[0]:+.3f} -- the claim {verdict}"
    worse = (boundary[1] and boundary[0] < 0) or (recall[1] and recall[0] < 0)
    if worse:
        verdict = "does not hold"
    elif boundary[1] and boundary[0] > 0:
        verdict = "holds"
    else:
        verdict = "cannot be told from seed noise"
    return (
        f"{method}: boundary IoU {boundary[0]:+.3f}, AR@100 {recall[0]:+.3f} vs gt_only -- "
        f"the claim {verdict}"
    )


def reading_paragraphs(
    results: SweepResults,
    reference: dict[str, dict[str, dict]],
    logs: dict[str, dict[str, Phases]],
    methods: list[str],
    soft_weight: float,
) -> list[str]:
    """The report's reading of the result, every figure taken from the runs."""
    t, b = reference["teacher"], reference["student_base"]
    others = [m for m in methods if m != BASELINE]
    duals = [m for m in methods if m.startswith("dual")]
    g_fine = stats(results, BASELINE, "fine", "mean_best_iou")
    g_orig = stats(results, BASELINE, "original", "mean_best_iou")
    out = [
        f"**Teacher vs student base.** Mean best IoU on the fine-tuning domain: teacher "
        f"{t['fine']['mean_best_iou']:.3f}, student base {b['fine']['mean_best_iou']:.3f} "
        f"({t['fine']['mean_best_iou'] - b['fine']['mean_best_iou']:+.3f}); on the original "
        f"domain {t['original']['mean_best_iou']:.3f} vs {b['original']['mean_best_iou']:.3f}.",
        f"**Fine-tuning domain** (mean best IoU, difference to gt_only "
        f"{'-' if g_fine is None else f'{g_fine[0]:.3f}'}): "
        + "; ".join(_versus(results, m, "fine", "mean_best_iou") for m in others)
        + ". AR@100: "
        + "; ".join(_versus(results, m, "fine", "ar100") for m in others)
        + ".",
        f"**Original domain -- forgetting** (student base {b['original']['mean_best_iou']:.3f}, "
        f"gt_only {'-' if g_orig is None else f'{g_orig[0]:.3f}'}): "
        + "; ".join(_versus(results, m, "original", "mean_best_iou") for m in others)
        + ".",
        "**The spec's claim** (dual supervision: better boundary quality without sacrificing "
        "recall), on the fine-tuning domain: "
        + "; ".join(_spec_claim(results, m) for m in duals)
        + ".",
    ]
    out.append(_log_sentence(logs, duals, soft_weight))
    return out


def _ratio(log: dict[str, Phases], k: int, weight: float) -> str:
    task = log["train/task_loss"][k]
    return f"{weight * log['train/soft'][k] / task:.0%}" if task else "-"


def _log_sentence(logs: dict[str, dict[str, Phases]], duals: list[str], weight: float) -> str:
    parts = []
    for m in duals:
        log = logs.get(m, {})
        if "train/soft" in log and "train/task_loss" in log:
            pairs = log.get("train/teacher_pairs", (float("nan"),) * 2)
            parts.append(
                f"{m}'s weighted soft term is {_ratio(log, 0, weight)} -> {_ratio(log, 1, weight)} "
                f"of its task loss, on {pairs[0]:.1f} -> {pairs[1]:.1f} teacher pairs per image"
            )
    replaced = logs.get("replace_gt", {}).get("train/replaced")
    if replaced is not None:
        parts.append(
            f"replace_gt replaced {replaced[0]:.1f} -> {replaced[1]:.1f} teacher masks per "
            "image by their GT mask"
        )
    matched = [
        f"{m} {log['train/matched_per_image'][0]:.1f} -> {log['train/matched_per_image'][1]:.1f}"
        for m, log in logs.items()
        if "train/matched_per_image" in log
    ]
    if matched:
        parts.append(
            "predictions matched to a target per image (what the task losses act on): "
            + ", ".join(matched)
        )
    return (
        "**From the training logs** (TensorBoard; first quarter of each run -> last quarter, "
        "mean over the seeds): " + "; ".join(parts) + "."
    )
