"""The demo's scenario: sizes, data splits, methods and the config of every stage.

A miniature of real use. A *teacher* that has seen a broad domain (the ``mixed`` sample style:
every shape and fill; the shipped checkpoint, :mod:`.teacher`) stands in for SAM-H; a *student
base* trained briefly on the original domain (``shapes``) stands in for ``mobile_sam.pt``. The
user's fine-tuning data come from a shifted domain (``shifted``: other shapes and fills) and
are partly annotated: a fixed fraction of each image's objects has no mask. Validation sets of
both domains are fully annotated: ``fine`` (does fine-tuning help on the new domain?) and
``original`` (does the student forget the old one?). Every method fine-tunes the same base on
the same data for the same steps, once per seed; only ``mask_teacher`` differs.

Every stage's config is an ordinary maskteacher config (plain data here, written to
``OUT/configs`` by the demo), so each stage can be re-run by hand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: fine-tuning methods: name -> the ``mask_teacher`` overrides (``--variant`` of the sweep)
METHODS: dict[str, dict[str, Any]] = {
    "gt_only": {"mask_teacher.enable": False},
    "replace_gt": {"mask_teacher.enable": True, "mask_teacher.method": "replace_gt"},
    "dual_l2": {
        "mask_teacher.enable": True,
        "mask_teacher.method": "dual_supervision",
        "mask_teacher.soft_loss.type": "l2",
    },
    "dual_kl": {
        "mask_teacher.enable": True,
        "mask_teacher.method": "dual_supervision",
        "mask_teacher.soft_loss.type": "kl",
    },
    "dual_kl_teacher": {
        "mask_teacher.enable": True,
        "mask_teacher.method": "dual_supervision",
        "mask_teacher.soft_loss.type": "kl_teacher",
    },
}
SOFT_WEIGHT = 0.5  # the spec's lambda_soft, the same for every dual method

#: the evaluation sets: name -> (sample style, what it tells)
EVAL_SETS = {
    "fine": "the fine-tuning domain (shifted), fully annotated",
    "original": "the student base's domain (shapes), fully annotated: forgetting shows here",
}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (defaults: under 10 minutes on 2 quiet CPU cores).

    seed: the data and the first fine-tuning seed (the others follow: seed + 1, ...)."""

    base_images: int = 96
    train_images: int = 48
    val_images: int = 16
    unlabelled: float = 0.5
    image_size: int = 128
    student_type: str = "vit_t_tiny"
    base_epochs: int = 15
    student_epochs: int = 10
    batch_size: int = 8
    seeds: int = 3
    seed: int = 0

    @property
    def fine_tune_seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


#: a smoke-test size: every stage and file in well under a minute, meaningless figures
QUICK = DemoSettings(
    base_images=8,
    train_images=6,
    val_images=2,
    base_epochs=2,
    student_epochs=1,
    batch_size=4,
    seeds=2,
)


@dataclass(frozen=True)
class DemoPaths:
    """Where each split and stage lives under the demo folder ``out``."""

    out: Path

    def data(self, split: str) -> Path:
        """split: original_train, original_val, fine_train, fine_val."""
        return self.out / "data" / split

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def base_run(self) -> Path:
        return self.out / "runs" / "student_base"

    @property
    def sweep(self) -> Path:
        return self.out / "sweep"


#: split -> (sample style, seed offset, fully annotated)
SPLITS = {
    "original_train": ("shapes", 0, True),
    "original_val": ("shapes", 1000, True),
    "fine_train": ("shifted", 2000, False),
    "fine_val": ("shifted", 3000, True),
}


def split_images(s: DemoSettings, split: str) -> int:
    return {"original_train": s.base_images, "fine_train": s.train_images}.get(split, s.val_images)


def base_config(p: DemoPaths, s: DemoSettings) -> dict[str, Any]:
    """What every stage shares: data layout, model size, the CPU, generation settings.

    The same single-mask decoding and filters are used for training's validation, precompute
    and evaluation (``precompute`` section).
    """
    return {
        "dataset": {"format": "folder", "mode": "everything", "grid_points": 8, "num_workers": 0},
        "model": {"type": s.student_type, "image_size": s.image_size},
        "train": {
            "lr": 3e-3,
            "encoder_lr_scale": 1.0,
            "batch_size": s.batch_size,
            "val_freq": 1000,
            "early_stop_patience": 0,
            "seed": s.seed,
            "device": "cpu",
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


def from_scratch(raw: dict[str, Any], *, train: Path, save: Path, epochs: int) -> dict[str, Any]:
    """Training from random weights (the teacher, the student base): every prompt an interior
    point of an object (``prompt_source: gt``) matched only to that object, any overlap counts
    (``match_iou_threshold: 0``) -- so the first steps, where nothing reaches the usual 0.3,
    still get a mask loss."""
    raw = copy.deepcopy(raw)
    raw["dataset"]["train_dataset"] = str(train)
    raw["model"]["save_path"] = str(save)
    raw["train"].update(
        {
            "epochs": epochs,
            "warmup_step": 10,
            "prompt_source": "gt",
            "max_prompts": 16,
            "match_iou_threshold": 0.0,
            "match_requires_point": True,
        }
    )
    return raw


def student_base_config(p: DemoPaths, s: DemoSettings) -> dict[str, Any]:
    return from_scratch(
        base_config(p, s),
        train=p.data("original_train"),
        save=p.base_run,
        epochs=s.base_epochs,
    )


def fine_tune_config(
    p: DemoPaths, s: DemoSettings, teacher: Path, base: Path, teacher_type: str
) -> dict[str, Any]:
    """The sweep's base config: fine-tune the student base on the partly annotated split with
    grid and object prompts and the usual matching (the method comes from :data:`METHODS`)."""
    raw = base_config(p, s)
    raw["dataset"]["train_dataset"] = str(p.data("fine_train"))
    raw["model"].update({"checkpoint_path": str(base), "save_path": str(p.sweep / "runs")})
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
    raw["mask_teacher"] = {
        "enable": False,
        "teacher_type": teacher_type,
        "checkpoint_path": str(teacher),
        "cache_path": str(p.cache),
        "soft_loss": {"weight": SOFT_WEIGHT},
    }
    return raw


def precompute_config(
    p: DemoPaths, s: DemoSettings, teacher: Path, teacher_type: str
) -> dict[str, Any]:
    """The teacher over the fine-tuning split and its validation set (teacher agreement)."""
    raw = base_config(p, s)
    raw["dataset"].update(
        {"train_dataset": str(p.data("fine_train")), "val_dataset": str(p.data("fine_val"))}
    )
    raw["model"]["type"] = teacher_type
    raw["mask_teacher"] = {
        "teacher_type": teacher_type,
        "checkpoint_path": str(teacher),
        "cache_path": str(p.cache),
    }
    return raw


def eval_config(
    p: DemoPaths, s: DemoSettings, model_type: str, split: str, cache: bool
) -> dict[str, Any]:
    """Evaluate a ``model_type`` checkpoint on the validation split ``split`` (with the teacher
    cache for teacher agreement when ``cache``)."""
    raw = base_config(p, s)
    raw["dataset"]["val_dataset"] = str(p.data(split))
    raw["model"]["type"] = model_type
    if cache:
        raw["mask_teacher"] = {"cache_path": str(p.cache)}
    return raw


def variant_arguments() -> list[list[str]]:
    """:data:`METHODS` as the sweep's ``--variant NAME KEY=VALUE ...`` arguments."""
    out = []
    for name, sets in METHODS.items():
        out.append(
            [
                name,
                *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()),
            ]
        )
    return out
