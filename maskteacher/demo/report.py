"""``report.md``: the scenario, the tables, the reading, the logs, pictures, times, commands.

Everything above "## Wall time and machine" depends only on the command and its seed (no
timings, no absolute paths), so two runs of the same demo on the same kind of machine give the
same text there; the wall times and the machine's load come last.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from maskteacher.demo import scenario
from maskteacher.demo.reading import method_logs, reading_paragraphs
from maskteacher.demo.run import REFERENCE_MODELS, DemoResult
from maskteacher.sweep.results import SweepResults, load_results, summary_table

TABLE_METRICS = {
    "mean_best_iou": "mean best IoU",
    "boundary_iou": "boundary IoU",
    "ar10": "AR@10",
    "ar100": "AR@100",
    "masks_per_image": "masks/img",
    "teacher_agreement": "teacher agreement",
}
TIMING_HEADING = "## Wall time and machine"

REAL_COMMANDS = """\
# 1. precompute SAM-H once (one GPU; or torchrun --nproc-per-node N, or a job array with
#    --num-shards N --shard-index I and then `maskteacher cache merge`)
maskteacher precompute configs/sam_h_to_mobilesam_replace_gt.yaml
maskteacher cache verify caches/sam_h_sa1b
# 2. fine-tune the MobileSAM student with every method x 3 seeds from that one cache
#    (the teacher is never built), each run evaluated; a job array runs one slice per task
maskteacher sweep configs/sam_h_to_mobilesam_replace_gt.yaml --out runs/methods --seeds 0,1,2 \\
    --variant gt_only mask_teacher.enable=false --variant replace_gt \\
    --variant dual_kl_teacher mask_teacher.method=dual_supervision mask_teacher.soft_loss.type=kl_teacher \\
    --index "$SLURM_ARRAY_TASK_ID" --count "$SLURM_ARRAY_TASK_COUNT"
# 3. when every task has finished: results.csv and summary.md (mean ± spread per method)
maskteacher sweep collect runs/methods
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _scenario_text(result: DemoResult) -> list[str]:
    s, recipe = result.settings, result.teacher.manifest.get("recipe", {})
    return [
        "# maskteacher demo report",
        "",
        f"**Scenario** (a miniature of real use; image_size {s.image_size}, {s.student_type} "
        f"students). Teacher: the shipped checkpoint ({result.teacher.model_type}, trained "
        f"{recipe.get('epochs', '?')} epochs on {recipe.get('images', '?')} images of every "
        "shape and fill of both domains -- `maskteacher demo --make-teacher`), the stand-in for "
        f"SAM-H. Student base: {s.base_epochs} epochs from random weights on {s.base_images} "
        "images of the original domain (ellipses, rectangles, polygons), the stand-in for "
        f"`mobile_sam.pt`. Fine-tuning split: {s.train_images} images of a shifted domain "
        f"(crosses, stars, blobs; other fills) with {s.unlabelled:.0%} of each image's objects "
        f"unlabelled. Every method fine-tunes the base for {s.student_epochs} epochs with the "
        f"same data, prompts and steps, once per seed ({', '.join(map(str, s.fine_tune_seeds))}), "
        "streaming the teacher from its cache; dual methods use soft_loss.weight "
        f"{scenario.SOFT_WEIGHT}. Evaluation (everything mode) on two fully annotated "
        f"validation sets of {s.val_images} images: `fine` -- {scenario.EVAL_SETS['fine']}; "
        f"`original` -- {scenario.EVAL_SETS['original']}.",
    ]


def _reference_table(result: DemoResult) -> list[str]:
    lines = [
        "## Reference models",
        "",
        "| model | set | " + " | ".join(TABLE_METRICS.values()) + " |",
        "|---|---|" + "---|" * len(TABLE_METRICS),
    ]
    for model in REFERENCE_MODELS:
        for eval_name, m in result.reference[model].items():
            cells = " | ".join(
                _fmt(m[k], 1 if k == "masks_per_image" else 3) for k in TABLE_METRICS
            )
            lines.append(f"| {model} | {eval_name} | {cells} |")
    return lines


def _run_rows(results: SweepResults) -> list[str]:
    cols = [("fine", k) for k in ("mean_best_iou", "boundary_iou", "ar100", "teacher_agreement")]
    cols += [("original", k) for k in ("mean_best_iou", "boundary_iou", "ar100")]
    head = " | ".join(f"{e}: {TABLE_METRICS[k]}" for e, k in cols)
    lines = ["## Every run (method x seed)", "", f"| method | seed | {head} |"]
    lines.append("|---|---|" + "---|" * len(cols))
    for r in results.records:
        cells = " | ".join(_fmt(r.metric(e, k)) for e, k in cols)
        lines.append(f"| {r.combination} | {r.seed} | {cells} |")
    return lines


def _log_table(logs: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    tags = {
        "train/task_loss": "task loss",
        "train/soft": "soft (unweighted)",
        "train/teacher_pairs": "teacher pairs/img",
        "train/replaced": "replaced/img",
        "train/matched_per_image": "matched/img",
        "train/matched_iou": "matched IoU",
    }
    lines = [
        "## Training logs",
        "",
        "Each run's TensorBoard scalars, mean over the first quarter of its logged windows -> "
        "over the last quarter, then over the seeds (`sweep/runs/<method>/seed_<S>/"
        "tensorboard`); the task loss includes the weighted soft term.",
        "",
        "| method | " + " | ".join(tags.values()) + " |",
        "|---|" + "---|" * len(tags),
    ]
    for method, log in logs.items():
        cells = [f"{_fmt(log[t][0], 3)} -> {_fmt(log[t][1], 3)}" if t in log else "-" for t in tags]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _pictures(result: DemoResult, results: SweepResults) -> list[str]:
    out = result.out
    lines = [
        "## Overlays",
        "",
        "image | ground truth | student (GT outlined) | teacher (GT outlined)",
        "",
    ]
    first_seed = result.settings.fine_tune_seeds[0]
    sources = [(m, out / "eval" / m) for m in REFERENCE_MODELS]
    sources += [
        (m, results.out / "runs" / m / f"seed_{first_seed}" / "eval") for m in scenario.METHODS
    ]
    for name, folder in sources:
        for eval_name in scenario.EVAL_SETS:
            pictures = sorted((folder / eval_name / "overlays").glob("*.png"))
            if pictures:
                rel = pictures[0].relative_to(out)
                lines += [f"**{name}, {eval_name}**: ![{name} {eval_name}]({rel})", ""]
    return lines


def _timing(result: DemoResult) -> list[str]:
    lines = [TIMING_HEADING, "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {st.name} | {st.seconds:.1f} |" for st in result.stages]
    lines.append(f"| total | {sum(st.seconds for st in result.stages):.1f} |")
    start, end = result.load.get("start"), result.load.get("end")
    lines += [
        "",
        f"One torch thread per stage; {os.cpu_count()} CPUs; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.2f}' for v in start or ())} at the start, "
        f"{'/'.join(f'{v:.2f}' for v in end or ())} at the end. Per-run train and evaluation "
        "seconds: `sweep/results.csv`.",
    ]
    return lines


def _reproduce(result: DemoResult) -> list[str]:
    return [
        "## Reproduce",
        "",
        "Every stage's resolved config is in `configs/` (e.g. `maskteacher train "
        "OUT/configs/student_base.yaml`, OUT being this demo's folder); the fine-tuning runs "
        "are one sweep (`sweep/sweep.json`), the same runs into a new folder: `maskteacher "
        "sweep OUT/configs/fine_tune.yaml --out new_sweep "
        + " ".join("--variant " + " ".join(v) for v in scenario.variant_arguments())
        + f" --seeds {','.join(map(str, result.settings.fine_tune_seeds))} "
        "--eval fine=OUT/data/fine_val --eval original=OUT/data/original_val`.",
        "",
        "With real checkpoints (SAM-H teacher, MobileSAM student):",
        "",
        "```bash",
        REAL_COMMANDS.rstrip(),
        "```",
        "",
    ]


def plot_losses(results: SweepResults, path: Path) -> None:
    """Per method: the training loss per step, averaged over the seeds (moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for method in scenario.METHODS:
        curves = [r.data.get("losses") or [] for r in results.finished(method)]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        v = np.mean([np.asarray(c[:n], dtype=float) for c in curves], axis=0)
        k = max(1, len(v) // 15)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss (mean over seeds, moving average)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def write_report(result: DemoResult) -> Path:
    """Write ``report.md`` and ``metrics.json`` (the reference rows and every run's figures)."""
    results = load_results(result.paths.sweep)
    methods = list(scenario.METHODS)
    logs = method_logs(results, methods)
    plot_losses(results, result.out / "loss_curves.png")
    lines = _scenario_text(result) + [""] + _reference_table(result)
    for eval_name, what in scenario.EVAL_SETS.items():
        lines += ["", f"## Mean ± spread over seeds: `{eval_name}` ({what})", ""]
        lines += summary_table(results, eval_name, TABLE_METRICS, label="method")
    lines += [
        "",
        "Mean ± sample standard deviation over the seeds. Mean best IoU: each ground-truth "
        "object's best-overlapping predicted mask, averaged over the objects; boundary IoU: of "
        "matched pairs (IoU >= 0.5); AR@100: COCO average recall of the 100 best-scored masks; "
        "teacher agreement: each cached teacher mask's best IoU with the student's masks.",
    ]
    lines += ["", "## Reading the result", ""]
    for paragraph in reading_paragraphs(
        results, result.reference, logs, methods, scenario.SOFT_WEIGHT
    ):
        lines += [paragraph, ""]
    lines += [
        "A difference counts as larger than the spreads when it exceeds the two standard "
        "deviations together -- a rough rule for 3 seeds, not a significance test. Tiny models "
        "on synthetic shapes: the report shows what each method does in this scenario, not "
        "which one wins on real data.",
        "",
    ]
    lines += _run_rows(results) + [""] + _log_table(logs)
    lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += _pictures(result, results)
    lines += _reproduce(result)
    lines += _timing(result) + [""]
    tmp = result.report.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(result.report)
    payload = {
        "reference": result.reference,
        "runs": [
            r.data.get("metrics") | {"method": r.combination, "seed": r.seed}
            for r in results.finished()
        ],
    }
    (result.out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    return result.report
