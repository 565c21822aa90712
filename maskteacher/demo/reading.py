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


def scalar_means(run: Path, tags: tuple[str, ...] = LOG_TAGS) -> dict[str, float]:
    """Mean of each TensorBoard scalar over the whole run (the logged window averages)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per file read
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in present:
            values = [e.value for e in acc.Scalars(tag)]
            out[tag] = sum(values) / len(values)
    return out


def method_logs(results: SweepResults, methods: list[str]) -> dict[str, dict[str, float]]:
    """method -> tag -> mean over the method's finished runs of the run means."""
    logs: dict[str, dict[str, float]] = {}
    for method in methods:
        per_run = [scalar_means(results.out / r.folder) for r in results.finished(method)]
        tags = {t for means in per_run for t in means}
        logs[method] = {
            t: sum(m[t] for m in per_run if t in m) / sum(t in m for m in per_run) for t in tags
        }
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
    if boundary is None or recall is None:
        return f"{method}: not measured"
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
    logs: dict[str, dict[str, float]],
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


def _log_sentence(logs: dict[str, dict[str, float]], duals: list[str], weight: float) -> str:
    parts = []
    for m in duals:
        log = logs.get(m, {})
        if "train/soft" in log and log.get("train/task_loss"):
            ratio = weight * log["train/soft"] / log["train/task_loss"]
            pairs = log.get("train/teacher_pairs", float("nan"))
            parts.append(
                f"{m}'s weighted soft term is {ratio:.0%} of its task loss ({pairs:.1f} teacher pairs per image)"
            )
    replaced = logs.get("replace_gt", {}).get("train/replaced")
    if replaced is not None:
        parts.append(f"replace_gt replaced {replaced:.1f} teacher masks per image by their GT mask")
    matched = [
        f"{m} {log['train/matched_per_image']:.1f}"
        for m, log in logs.items()
        if "train/matched_per_image" in log
    ]
    if matched:
        parts.append("matched predictions per image: " + ", ".join(matched))
    return (
        "**From the training logs** (TensorBoard, mean over each run and its seeds): "
        + "; ".join(parts)
        + "."
    )
