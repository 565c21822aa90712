"""Helpers for the trainer tests: tiny sample datasets, tiny caches, config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from maskteacher.cache_format import (
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    dataset_fingerprint,
    finalize,
    init_cache,
)
from maskteacher.cache_format.writer import record_failure
from maskteacher.config import load_config
from maskteacher.data import input_size, make_sample, masks_to_lowres, open_dataset

IMAGE_SIZE = 64
SIZE_RANGE = (48, 80)


def make_data(root: Path, *, images: int, seed: int) -> Path:
    return make_sample(root, format="folder", images=images, seed=seed, size_range=SIZE_RANGE)


def write_cache(
    root: Path,
    datasets: dict[str, Path],
    *,
    image_size: int = IMAGE_SIZE,
    teacher: bool = False,
    skip: tuple[str, ...] = (),
    failed: tuple[str, ...] = (),
    codec: str = "int8",
) -> Path:
    """A small cache holding the datasets' ground truth (and fake teacher masks if asked).

    The teacher masks are the ground truth's own masks as logits (+-8) with each mask's first
    interior pixel as its prompt point, so tests can check flips and dequantisation. Images in
    ``skip`` are left out; those in ``failed`` are left out and recorded as precompute failures.
    """
    fingerprints = {}
    opened = {}
    for split, path in datasets.items():
        ds = open_dataset(path)
        opened[split] = ds
        fingerprints[split] = dataset_fingerprint(ds.fingerprint_entries())
    header = CacheHeader(
        teacher_type="vit_b_tiny",
        checkpoint_sha256="0" * 64,
        image_size=image_size,
        params={"points_per_side": 4},
        codec=Codec(name=codec),
        store=StoreFlags(teacher=teacher, gt=True),
        fingerprints=fingerprints,
    )
    init_cache(root, header)
    low = image_size // 4
    for split, ds in opened.items():
        with ShardWriter(root, f"{split}-0", split=split) as writer:
            for i in range(len(ds)):
                sample = ds[i]
                if sample.image_id in skip or sample.image_id in failed:
                    if sample.image_id in failed:
                        record_failure(root, "w0", sample.image_id, split, "teacher crashed")
                    continue
                gt = masks_to_lowres(sample.masks, sample.orig_hw, image_size).numpy()
                input_hw = input_size(sample.orig_hw, image_size)
                n = gt.shape[0] if teacher else 0
                logits = np.where(gt[:n], 8.0, -8.0).astype(np.float32)
                points = np.zeros((n, 2), np.float32)
                for k in range(n):
                    rows, cols = np.nonzero(gt[k])
                    if rows.size:
                        points[k] = [(cols[0] + 0.5) * 4, (rows[0] + 0.5) * 4]
                writer.add(
                    CacheRecord(
                        image_id=sample.image_id,
                        split=split,
                        orig_hw=np.asarray(sample.orig_hw, np.int64),
                        input_hw=np.asarray(input_hw, np.int64),
                        teacher_logits=logits if teacher else np.zeros((0, low, low), np.float32),
                        teacher_points=points,
                        teacher_iou=np.full((n,), 0.9, np.float32),
                        teacher_stability=np.full((n,), 0.95, np.float32),
                        teacher_boxes=np.zeros((n, 4), np.float32),
                        gt_masks=gt,
                    )
                )
    finalize(root)
    return root


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data) if path.suffix != ".json" else json.dumps(data))
    return path


def tiny_config(
    tmp_path: Path,
    data: dict[str, Path],
    *,
    name: str = "cfg.yaml",
    load: bool = True,
    **sections: dict[str, Any],
):
    """Write (and load, unless ``load`` is false) a tiny everything-mode config; ``sections``
    update the defaults. Returns (Config or None, path)."""
    base: dict[str, Any] = {
        "dataset": {
            "train_dataset": str(data["train"]),
            "val_dataset": None,
            "format": "folder",
            "mode": "everything",
            "grid_points": 4,
            "num_workers": 0,
        },
        "model": {
            "type": "vit_t_tiny",
            "image_size": IMAGE_SIZE,
            "save_path": str(tmp_path / "run"),
        },
        "train": {
            "epochs": 1,
            "lr": 1.0e-3,
            "batch_size": 2,
            "warmup_step": 1,
            "max_prompts": 8,
            "device": "cpu",
            "log_every": 1,
            "seed": 0,
        },
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = write_config(tmp_path / name, base)
    return (load_config(path) if load else None), path
