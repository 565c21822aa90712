"""``maskteacher demo``: the whole pipeline on built-in sample data, small enough for 2 CPU cores.

Stages (each timed, each with its own progress bars):

1. make the sample dataset (synthetic shapes with exact masks): train and val splits;
2. train a small teacher briefly on the ground truth (no pretrained weights ship with the
   package, so the demo makes its own teacher) and export it as an official-format checkpoint;
3. train a small student base briefly on the ground truth: the stand-in for the pretrained
   ``mobile_sam.pt`` a real fine-tune starts from;
4. precompute the teacher's everything-mode cache for both splits (``maskteacher precompute``);
5. fine-tune the student base with each supervision method for the same number of steps,
   streaming the teacher from the cache: gt-only, replace_gt, dual_supervision l2 and kl;
6. evaluate every student (and the teacher) on the validation split (``maskteacher eval``);
7. write ``report.md`` with the metrics table, stage wall times, a loss-curve plot and overlay
   pictures, and the resolved configs that reproduce each stage.

The configs are ordinary maskteacher configs (written to ``OUT/configs``), so each stage can be
re-run by hand with the CLI; the report ends with the commands for real checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskteacher.config import Config, config_from_dict
from maskteacher.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".maskteacher-demo"

#: student runs: name -> the ``mask_teacher`` block (the cache path is added by the demo)
METHODS: dict[str, dict[str, Any]] = {
    "gt_only": {"enable": False},
    "replace_gt": {"enable": True, "method": "replace_gt"},
    "dual_l2": {
        "enable": True,
        "method": "dual_supervision",
        "soft_loss": {"type": "l2", "weight": 0.5},
    },
    "dual_kl": {
        "enable": True,
        "method": "dual_supervision",
        "soft_loss": {"type": "kl", "weight": 0.5},
    },
}


@dataclass
class DemoSettings:
    """Sizes of the demo run (defaults: a few minutes on 2 CPU cores)."""

    train_images: int = 48
    val_images: int = 8
    image_size: int = 128
    teacher_type: str = "vit_t_tiny"
    student_type: str = "vit_t_tiny"
    teacher_epochs: int = 60
    base_epochs: int = 30
    student_epochs: int = 8
    batch_size: int = 8
    seed: int = 0


#: a smoke-test size: every stage and file, about a minute on 2 CPU cores, meaningless figures
QUICK = DemoSettings(
    train_images=6, val_images=2, teacher_epochs=2, base_epochs=2, student_epochs=1, batch_size=4
)


@dataclass
class StageTime:
    name: str
    seconds: float


@dataclass
class DemoResult:
    out: Path
    report: Path
    stages: list[StageTime] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def base_config(out: Path, s: DemoSettings) -> dict[str, Any]:
    """The config every demo stage starts from (plain data, as a user would write it).

    Training from random weights needs a different recipe from fine-tuning: every prompt is an
    interior point of an object (``prompt_source: gt``), a prediction may only be matched to the
    object holding its prompt, and any overlap counts (``match_iou_threshold: 0``), so the
    first steps, where nothing reaches the usual 0.3, still get a mask loss. The same
    single-mask decoding is used for training, precompute and evaluation.
    """
    return {
        "dataset": {
            "train_dataset": str(out / "data" / "train"),
            "val_dataset": str(out / "data" / "val"),
            "format": "folder",
            "mode": "everything",
            "grid_points": 8,
            "num_workers": 0,
        },
        "model": {"type": s.student_type, "image_size": s.image_size},
        "train": {
            "epochs": s.base_epochs,
            "lr": 3e-3,
            "encoder_lr_scale": 1.0,
            "batch_size": s.batch_size,
            "val_freq": 1000,
            "warmup_step": 10,
            "early_stop_patience": 0,
            "seed": s.seed,
            "device": "cpu",
            "prompt_source": "gt",
            "max_prompts": 16,
            "match_iou_threshold": 0.0,
            "match_requires_point": True,
            "loss_weights": {"bce": 1.0, "focal": 0.0, "dice": 1.0, "iou": 1.0, "cls": 1.0},
            "log_every": 5,
        },
        "freeze": {"batchnorm_eval": False},
        "precompute": {
            "points_per_side": 8,
            "points_per_batch": 64,
            "multimask_output": False,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.3,
            "max_masks_per_image": 24,
            "box_nms_thresh": 0.7,
            "shard_size": 16,
            "batch_size": 8,
            "num_workers": 0,
            "device": "cpu",
        },
    }


def teacher_config(out: Path, s: DemoSettings) -> dict[str, Any]:
    raw = base_config(out, s)
    raw["model"].update({"type": s.teacher_type, "save_path": str(out / "runs" / "teacher")})
    # its own seed: another initialisation and data order than the student base
    raw["train"].update({"epochs": s.teacher_epochs, "seed": s.seed + 1})
    return raw


def student_base_config(out: Path, s: DemoSettings) -> dict[str, Any]:
    raw = base_config(out, s)
    raw["model"]["save_path"] = str(out / "runs" / "student_base")
    return raw


def student_config(
    out: Path, s: DemoSettings, method: str, teacher_ckpt: Path, base_ckpt: Path
) -> dict[str, Any]:
    """Fine-tune the student base with one method: grid and object prompts, the usual matching."""
    raw = base_config(out, s)
    raw["model"].update(
        {"checkpoint_path": str(base_ckpt), "save_path": str(out / "runs" / method)}
    )
    raw["train"].update(
        {
            "epochs": s.student_epochs,
            "lr": 1e-3,
            "warmup_step": 4,
            "prompt_source": "mixed",
            "max_prompts": 32,
            "match_iou_threshold": 0.3,
        }
    )
    block = copy.deepcopy(METHODS[method])
    block.update(
        {
            "teacher_type": s.teacher_type,
            "checkpoint_path": str(teacher_ckpt),
            "cache_path": str(out / "cache"),
        }
    )
    raw["mask_teacher"] = block
    return raw


def precompute_config(out: Path, s: DemoSettings, teacher_ckpt: Path) -> dict[str, Any]:
    raw = base_config(out, s)
    raw["model"]["type"] = s.teacher_type
    raw["mask_teacher"] = {
        "teacher_type": s.teacher_type,
        "checkpoint_path": str(teacher_ckpt),
        "cache_path": str(out / "cache"),
    }
    return raw


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(
                f"{out} exists and is not empty; choose another --out (the demo only replaces "
                "folders it created itself)"
            )
        if not force:
            raise UserError(f"{out} holds an earlier demo run; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by maskteacher demo\n")


def _save_config(out: Path, name: str, raw: dict[str, Any]) -> Config:
    cfg = config_from_dict(raw)
    folder = out / "configs"
    folder.mkdir(exist_ok=True)
    cfg.save(folder / f"{name}.yaml")
    return cfg


class _Timer:
    def __init__(self, stages: list[StageTime], name: str) -> None:
        self.stages, self.name = stages, name

    def __enter__(self) -> _Timer:
        log.info("demo: %s", self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stages.append(StageTime(self.name, time.perf_counter() - self.start))


def run_demo(
    out: str | Path, *, settings: DemoSettings | None = None, force: bool = False
) -> DemoResult:
    """Run every stage into ``out``; returns the figures and the path of ``report.md``."""
    from maskteacher.data import make_sample
    from maskteacher.eval.run import evaluate_checkpoint
    from maskteacher.precompute import PrecomputeJob, run_precompute
    from maskteacher.train.run import train

    s = settings or DemoSettings()
    out = Path(out)
    _prepare_out(out, force)
    result = DemoResult(out=out, report=out / "report.md")
    stages = result.stages
    losses: dict[str, list[float]] = {}
    train_seconds: dict[str, float] = {}

    with _Timer(stages, "make sample data"):
        make_sample(out / "data" / "train", format="folder", images=s.train_images, seed=s.seed)
        make_sample(out / "data" / "val", format="folder", images=s.val_images, seed=s.seed + 1000)

    def run_training(name: str, raw: dict[str, Any]) -> Path:
        start = time.perf_counter()
        run = train(_save_config(out, name, raw))
        train_seconds[name] = time.perf_counter() - start
        losses[name] = run.losses
        if run.export_path is None or not Path(run.export_path).is_file():
            raise RuntimeError(f"the {name} run did not export its weights")
        return Path(run.export_path)

    with _Timer(stages, f"train teacher ({s.teacher_type}, ground truth, random init)"):
        teacher_ckpt = run_training("teacher", teacher_config(out, s))

    with _Timer(stages, f"train student base ({s.student_type}, ground truth, random init)"):
        base_ckpt = run_training("student_base", student_base_config(out, s))

    with _Timer(stages, "precompute teacher cache"):
        pre_cfg = _save_config(out, "precompute", precompute_config(out, s, teacher_ckpt))
        summary = run_precompute(PrecomputeJob.from_config(pre_cfg))
        print(summary.format())
        if summary.exit_code:
            raise RuntimeError("precompute failed: see the summary above")

    exports: dict[str, tuple[Config, Path]] = {}
    for method in METHODS:
        with _Timer(stages, f"fine-tune student: {method}"):
            raw = student_config(out, s, method, teacher_ckpt, base_ckpt)
            exports[method] = (config_from_dict(raw), run_training(method, raw))

    with _Timer(stages, "evaluate"):
        teacher_eval = config_from_dict(
            {**precompute_config(out, s, teacher_ckpt), "model": {
                "type": s.teacher_type, "image_size": s.image_size}}
        )  # fmt: skip
        result.metrics["teacher"] = _evaluate(
            evaluate_checkpoint, teacher_eval, teacher_ckpt, out / "eval" / "teacher"
        )
        base_eval = config_from_dict(student_config(out, s, "gt_only", teacher_ckpt, base_ckpt))
        result.metrics["student_base"] = _evaluate(
            evaluate_checkpoint, base_eval, base_ckpt, out / "eval" / "student_base"
        )
        for method, (cfg, ckpt) in exports.items():
            result.metrics[method] = _evaluate(
                evaluate_checkpoint, cfg, ckpt, out / "eval" / method
            )

    _plot_losses(losses, out / "loss_curves.png")
    write_report(result, s, train_seconds)
    return result


def _evaluate(evaluate_checkpoint, cfg: Config, ckpt: Path, folder: Path) -> dict[str, Any]:
    """Evaluate on one torch thread: on 2 shared cores a 2-thread OpenMP team slows down up to
    10x whenever another process takes a core, which made ms/img swing between runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = evaluate_checkpoint(cfg, ckpt, folder, overlays=2)
    finally:
        torch.set_num_threads(threads)
    return metrics.summary()


def _plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in losses.items():
        if not values:
            continue
        v = np.asarray(values, dtype=float)
        k = max(1, len(v) // 20)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss (moving average)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


REAL_COMMANDS = """\
# 1. precompute SAM-H once (one GPU; or torchrun --nproc-per-node N, or a job array with
#    --num-shards N --shard-index I and then `maskteacher cache merge`)
maskteacher precompute configs/sam_h_to_mobilesam_replace_gt.yaml
maskteacher cache verify caches/sam_h_sa1b
# 2. train the MobileSAM student with each method (the teacher is never built: cache only)
maskteacher train configs/sam_h_to_mobilesam_replace_gt.yaml
maskteacher train configs/sam_h_to_mobilesam_replace_gt.yaml --set mask_teacher.method=dual_supervision --set mask_teacher.soft_loss.type=kl --set model.save_path=runs/dual_kl
# 3. evaluate
maskteacher eval configs/sam_h_to_mobilesam_replace_gt.yaml --checkpoint runs/replace_gt/best.pt --out runs/replace_gt/eval
"""


def write_report(result: DemoResult, s: DemoSettings, train_seconds: dict[str, float]) -> Path:
    """Write ``report.md``: metrics table, stage times, pictures, reproduction commands."""
    out = result.out
    lines = [
        "# maskteacher demo report",
        "",
        f"Sample data: {s.train_images} train / {s.val_images} val synthetic images; "
        f"image_size {s.image_size}. Teacher {s.teacher_type}: {s.teacher_epochs} epochs on ground "
        f"truth from random weights. Student base {s.student_type}: {s.base_epochs} epochs on "
        f"ground truth from random weights. Each method then fine-tunes the student base for "
        f"{s.student_epochs} epochs (same data order and prompts), teacher outputs streamed from "
        "the cache; the teacher model is never built while students train.",
        "",
        "## Everything-mode metrics (validation split)",
        "",
        "| model | mean best IoU | AR@10 | AR@100 | boundary IoU | masks/img | ms/img | "
        "teacher agreement | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result.metrics.items():
        lines.append(
            f"| {name} | {_fmt(m['mean_best_iou'])} | {_fmt(m['ar10'])} | {_fmt(m['ar100'])} | "
            f"{_fmt(m['boundary_iou'])} | {_fmt(m['masks_per_image'], 1)} | "
            f"{_fmt(m['ms_per_image'], 1)} | {_fmt(m['teacher_agreement'])} | "
            f"{_fmt(train_seconds.get(name), 1)} |"
        )
    lines += [
        "",
        "ms/img: everything-mode inference per image (grid prompts, filters, masks to the original "
        "frame) on one CPU thread. Tiny models trained from scratch for minutes: the table shows "
        "that every stage works end to end, not which method wins on real data.",
    ]
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {st.name} | {st.seconds:.1f} |" for st in result.stages]
    lines += [f"| total | {sum(st.seconds for st in result.stages):.1f} |"]
    lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)", "", "## Overlays", ""]
    lines.append("image | ground truth | student (GT outlined) | teacher (GT outlined)")
    lines.append("")
    for name in result.metrics:
        pictures = sorted((out / "eval" / name / "overlays").glob("*.png"))
        if pictures:
            lines.append(f"**{name}**: ![{name}]({pictures[0].relative_to(out)})")
            lines.append("")
    lines += [
        "## Reproduce",
        "",
        "Every stage's resolved config is in `configs/`; e.g. "
        "`maskteacher train configs/dual_kl.yaml`, "
        "`maskteacher eval configs/dual_kl.yaml --checkpoint runs/dual_kl/student_official.pth`.",
        "",
        "With real checkpoints (SAM-H teacher, MobileSAM student):",
        "",
        "```bash",
        REAL_COMMANDS.rstrip(),
        "```",
        "",
    ]
    tmp = result.report.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(result.report)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str) + "\n")
    return result.report
