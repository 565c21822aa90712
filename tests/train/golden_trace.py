"""Golden trace of the trainer: fixed-seed per-step losses of short CPU runs, and a cache hash.

Recorded once before the ``train/`` redesign (issue 12) and kept as a test
(:mod:`test_golden_trace`): a restructuring must change no number. It drives only public entry
points -- ``maskteacher precompute`` (the CLI) and :func:`maskteacher.train.train` -- so it
outlives any reshuffling of the modules behind them.

Runs (vit_t_tiny student at 64 px, 4 training images, 2 epochs of 2 micro-batches): gt-only from
the dataset and from the cache, replace_gt (with and without ``gt_override``), dual l2, dual kl
(all pixels and sampled ``loss_points``), dual kl with an online teacher, the teacher prompt
source, each feature-distillation block, single mode (points / boxes / mixed), and a run with a
stage schedule, freezing and gradient accumulation. Each run records every micro-batch's loss,
the matched IoU, every TensorBoard scalar (the loss terms at ``log_every: 1``) and the sha256 of
the exported student's tensors. The cache's content hash covers every decoded record field.

Regenerate (only when a change is *meant* to change numbers, and say so in the commit)::

    python tests/train/golden_trace.py --write
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "golden_trace.json"
IMAGE_SIZE = 64

GEN = {
    "points_per_side": 6,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.2,
    "stability_score_thresh": 0.5,
    "box_nms_thresh": 1.0,
    "store": {"teacher": True, "gt": True, "embedding": True, "tokens": True},
}


def _save_model(path: Path, model_type: str, seed: int, scale: float) -> Path:
    from maskteacher.models import build_sam

    torch.manual_seed(seed)
    model = build_sam(model_type, image_size=IMAGE_SIZE)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(scale)
            mlp.layers[-1].bias.mul_(scale)
    torch.save(model.state_dict(), path)
    return path


def _base(root: Path, data: Path, student: Path, teacher: Path) -> dict[str, Any]:
    return {
        "dataset": {
            "train_dataset": str(data),
            "format": "folder",
            "mode": "everything",
            "grid_points": 4,
            "num_workers": 0,
        },
        "model": {
            "type": "vit_t_tiny",
            "image_size": IMAGE_SIZE,
            "checkpoint_path": str(student),
        },
        "train": {
            "epochs": 2,
            "lr": 1.0e-3,
            "batch_size": 2,
            "warmup_step": 1,
            "max_prompts": 8,
            "device": "cpu",
            "log_every": 1,
            "seed": 0,
            "match_iou_threshold": 0.05,
        },
        "mask_teacher": {
            "enable": False,
            "teacher_type": "vit_b_tiny",
            "checkpoint_path": str(teacher),
            "cache_path": str(root / "cache"),
            "iou_threshold": 0.1,
        },
        "precompute": copy.deepcopy(GEN) | {"shard_size": 2, "batch_size": 2, "num_workers": 0},
    }


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _kd(block: str, **values: Any) -> dict[str, Any]:
    return {"distillation": {"enable": True, block: {"enable": True, **values}}}


def _dual(kind: str) -> dict[str, Any]:
    return {
        "mask_teacher": {
            "enable": True,
            "method": "dual_supervision",
            "soft_loss": {"type": kind, "weight": 0.5},
        }
    }


#: name -> config update of the base run.
RUNS: dict[str, dict[str, Any]] = {
    "gt_dataset": {"mask_teacher": {"cache_path": None}},
    "gt_cache": {},
    "replace_gt": {"mask_teacher": {"enable": True, "method": "replace_gt"}},
    "replace_gt_soft": {
        "mask_teacher": {"enable": True, "method": "replace_gt", "gt_override": False}
    },
    "dual_l2": _dual("l2"),
    "dual_kl": _dual("kl"),
    "dual_kl_points": _merge(_dual("kl"), {"train": {"loss_points": 64}}),
    "dual_kl_online": _merge(_dual("kl"), {"mask_teacher": {"cache_path": None}}),
    "teacher_prompts": {"train": {"prompt_source": "teacher"}},
    "kd_encoder": _kd("encoder_matching", lambda_kl=0.5),
    "kd_decoder": _kd("decoder_matching", lambda_kl=0.5),
    "kd_attention": _kd("attention_matching"),
    "kd_relational": _merge(_kd("relational_KD"), {"train": {"batch_size": 4}}),
    "single_points": {
        "dataset": {"mode": "single", "prompt_mode": "points"},
        "mask_teacher": {"cache_path": None},
    },
    "single_mixed": {
        "dataset": {"mode": "single", "prompt_mode": "mixed", "max_points": 3},
        "model": {"multimask_output": True},
        "mask_teacher": {"cache_path": None},
    },
    "stages_freeze_accum": _merge(
        _dual("l2"),
        {
            "train": {"gradient_accumulation": 2, "epochs": 3},
            "freeze": {"freeze_image_encoder": True, "unfreeze_epoch": 1},
            "stage_schedule": [
                {"name": "warm", "start_epoch": 0, "end_epoch": 1, "loss_weights": {"dice": 0.0}}
            ],
        },
    ),
}


def _floats(values) -> list[str]:
    """Exact float text (hex) so equality is bit equality; NaN written as 'nan'."""
    return ["nan" if math.isnan(v) else float(v).hex() for v in values]


def _state_hash(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _scalars(folder: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    skip = ("time/", "train/lr")
    return {
        tag: _floats(e.value for e in acc.Scalars(tag))
        for tag in sorted(acc.Tags()["scalars"])
        if not tag.startswith(skip)
    }


def cache_hash(path: Path) -> str:
    """sha256 over every decoded record (split, id, each field's dtype, shape and bytes)."""
    from maskteacher.cache_format import open_cache

    reader = open_cache(str(path))
    digest = hashlib.sha256()
    records = sorted((reader[i] for i in range(len(reader))), key=lambda r: (r.split, r.image_id))
    names = [
        "orig_hw",
        "input_hw",
        "teacher_logits",
        "teacher_points",
        "teacher_iou",
        "teacher_stability",
        "teacher_boxes",
        "gt_masks",
        "embedding",
        "tokens",
    ]
    for rec in records:
        digest.update(f"{rec.split}/{rec.image_id}".encode())
        for name in names:
            value = getattr(rec, name)
            if value is None:
                digest.update(f"{name}:none".encode())
                continue
            arr = np.ascontiguousarray(value)
            digest.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def _run(name: str, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    from maskteacher.config import load_config
    from maskteacher.train import train

    data = _merge(data, {"model": {"save_path": str(folder / name)}})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    result = train(load_config(path))
    return {
        "losses": _floats(result.losses),
        "matched_iou": _floats(result.matched_iou),
        "scalars": _scalars(folder / name / "tensorboard"),
        "student_sha256": _state_hash(result.export_path),
    }


def trace(only: list[str] | None = None, update: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make the data, precompute the cache, run every (or ``only`` the named) run, each with
    ``update`` (a config update, e.g. another setting to compare with) merged in last."""
    from maskteacher.cli import main
    from maskteacher.data import make_sample

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = make_sample(
                root / "train", format="folder", images=4, seed=0, size_range=(48, 80)
            )
            student = _save_model(root / "student.pt", "vit_t_tiny", 1, 1000.0)
            teacher = _save_model(root / "teacher.pt", "vit_b_tiny", 0, 1000.0)
            base = _base(root, data, student, teacher)
            cfg = root / "precompute.yaml"
            cfg.write_text(yaml.safe_dump(base))
            code = main(["precompute", str(cfg), "--no-progress"])
            if code != 0:
                raise RuntimeError(f"precompute failed with exit code {code}")
            out: dict[str, Any] = {"cache_sha256": cache_hash(root / "cache"), "runs": {}}
            for name, changes in RUNS.items():
                if only is None or name in only:
                    config = _merge(_merge(base, changes), update or {})
                    out["runs"][name] = _run(name, config, root)
            return out
    finally:
        torch.set_num_threads(before)


def environment() -> dict[str, str]:
    """What bit-identical results depend on besides the code (recorded with the fixture)."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    args = parser.parse_args()
    result = trace() | {"environment": environment()}
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(text + "\n")
        print(f"wrote {FIXTURE}")
    else:
        print(text)
