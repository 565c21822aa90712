"""The origin project's four distillation recipes as tiny configs on sample data in its folder
layout (``image/<stem>.png`` + ``mask/<stem>/<k>.png``), with two teachers precomputed by
``maskteacher precompute CONFIG --teacher NAME``.

The recipes (the origin's ``configs/``): ``mobileSAM.json`` (single mode, point / box prompts,
distillation on), ``mobileSAM_se.json`` (segment-everything, distillation on),
``distill_then_finetune.json`` (a distill-only stage whose task-loss weights are 0, then a
fine-tune stage without distillation) and ``finetune_then_distill.json`` (the reverse). The two
teachers stand in for SAM-H (weight 0.7) and MobileSAM (weight 0.3); each is named by an origin
style ``cfg`` YAML and has its own cache, holding its image embeddings and its decoder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mask_teacher_helpers import save_teacher
from train_helpers import IMAGE_SIZE, make_data

from maskteacher.cli import main
from maskteacher.config import load_config

#: name -> (registry type, seed, weight): SAM-H and MobileSAM stand-ins of equal width (64).
TEACHERS = {"sam_h": ("vit_b_tiny", 0, 0.7), "mobile_sam": ("vit_t_tiny", 2, 0.3)}
TASK = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
ZERO = dict.fromkeys(TASK, 0.0)
ALL_BLOCKS = {
    "encoder_patch": {"enable": True, "w_l2": 1.0, "w_cos": 1.0},
    "prompt_embed": {"enable": True, "w_mse": 0.7, "w_cos": 0.3},
    "decoder_mask_token": {"enable": True, "w_kl": 1.0, "temperature": 0.5},
    "dense_mask_logits": {"enable": True, "w_kl": 0.6, "w_focal": 0.4, "gamma": 2.0},
}
SHORT = {"encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits"}


def origin_setup(root: Path) -> dict[str, Any]:
    """Sample data (train 4 images, val 2), a student start, two teacher checkpoints with their
    origin-style cfg YAMLs."""
    out: dict[str, Any] = {
        "root": root,
        "train": make_data(root / "data" / "train", images=4, seed=3),
        "val": make_data(root / "data" / "val", images=2, seed=4),
        "student": save_teacher(root / "mobile_sam.pt", 1, model_type="vit_t_tiny"),
    }
    for name, (kind, seed, _) in TEACHERS.items():
        out[name] = save_teacher(root / f"{name}.pth", seed, model_type=kind)
        (root / f"{name}.yaml").write_text(f"model:\n  type: {kind}\n")
    return out


def base_config(setup: dict[str, Any], run: str, *, mode: str = "single") -> dict[str, Any]:
    """The shared part of the four recipes (tiny sizes)."""
    root = setup["root"]
    return {
        "dataset": {
            "train_dataset": str(setup["train"]),
            "val_dataset": str(setup["val"]),
            "mode": mode,
            "prompt_mode": "mixed",
            "min_points": 1,
            "max_points": 3,
            "max_bbox_shift": 4,
            "grid_points": 3,
            "num_workers": 0,
        },
        "model": {
            "type": "vit_t_tiny",
            "checkpoint_path": str(setup["student"]),
            "image_size": IMAGE_SIZE,
            "save_path": str(root / run),
        },
        "train": {
            "epochs": 2,
            "lr": 1.0e-3,
            "batch_size": 2,
            "warmup_step": 1,
            "max_prompts": 4,
            "device": "cpu",
            "log_every": 1,
            "seed": 0,
            "early_stop_patience": 0,
            "loss_weights": dict(TASK),
        },
        "distillation": {"enable": True, "lambda_coef": 1.0, **copy.deepcopy(ALL_BLOCKS)},
        "teachers": [
            {
                "name": name,
                "cfg": str(root / f"{name}.yaml"),
                "checkpoint": str(setup[name]),
                "weight": weight,
                "cache_path": str(root / "caches" / name),
            }
            for name, (_, _, weight) in TEACHERS.items()
        ],
        "precompute": {
            "store": {"teacher": False, "gt": False, "embedding": True, "tokens": False},
            "shard_size": 4,
            "batch_size": 2,
            "num_workers": 0,
            "device": "cpu",
        },
    }


def recipe(setup: dict[str, Any], name: str) -> dict[str, Any]:
    """One of the origin's four recipes (module docstring)."""
    if name == "mobileSAM":
        cfg = base_config(setup, name)
        cfg["distillation"]["dynamic_lambda"] = {
            "enable_plateau_scheduler": True,
            "patience": 1,
            "factor": 0.5,
        }
        return cfg
    if name == "mobileSAM_se":
        cfg = base_config(setup, name, mode="everything")
        cfg["distillation"]["dense_mask_logits"]["enable"] = False  # the origin's default
        return cfg
    cfg = base_config(setup, name)
    distill = {"name": "distill_only", "distillation": True, "loss_weights": dict(ZERO)}
    finetune = {"name": "finetune", "distillation": False, "loss_weights": dict(TASK)}
    first, second = (distill, finetune) if name == "distill_then_finetune" else (finetune, distill)
    cfg["stage_schedule"] = [
        {**first, "start_epoch": 0, "end_epoch": 1},
        {**second, "start_epoch": 1, "end_epoch": 2},
    ]
    return cfg


def write_recipe(setup: dict[str, Any], name: str, **updates: Any) -> Path:
    cfg = recipe(setup, name)
    for section, values in updates.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = setup["root"] / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def precompute_teachers(setup: dict[str, Any]) -> None:
    """``maskteacher precompute CONFIG --teacher NAME`` for each teacher (one cache each)."""
    path = write_recipe(setup, "distill_then_finetune")
    for name in TEACHERS:
        code = main(["precompute", str(path), "--teacher", name, "--no-progress"])
        assert code == 0, name


def load(path: Path):
    return load_config(path)


def scalars_by_step(run) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def kd_sum(tags, step: int, scale: float = 1.0) -> float:
    """lambda_coef (1.0 x scale) * sum over teachers of weight * sum of the block terms."""
    return scale * sum(
        weight * tags[f"train/kd/{name}/{block}"][step]
        for name, (_, _, weight) in TEACHERS.items()
        for block in SHORT
    )


def task_sum(tags, step: int) -> float:
    return sum(w * tags[f"train/{k}"][step] for k, w in TASK.items())
