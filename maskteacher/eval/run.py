"""``maskteacher eval``: everything-mode inference with a student checkpoint on the validation set.

For each image: grid prompts and the same filtering as precompute
(:func:`maskteacher.models.everything.generate_everything` with the config's ``precompute``
parameters), masks taken back to the original frame, compared with the dataset's ground truth
and, when the config names a teacher cache holding the split made from these images (same
dataset fingerprint), with the cached teacher masks.

Writes into ``out``: ``metrics.json`` (dataset figures + settings), ``per_image.csv`` (one row
per image) and ``overlays/<image_id>.png`` (image | ground truth | student | teacher) for the
first ``overlays`` images.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from maskteacher.cache_format import CacheReader, dataset_fingerprint
from maskteacher.config import Config
from maskteacher.data import open_dataset, to_model_input
from maskteacher.devices import resolve_device
from maskteacher.errors import UserError
from maskteacher.eval.metrics import DatasetMetrics, ImageResult, MetricsAccumulator
from maskteacher.models import build_sam
from maskteacher.models.everything import (
    GenerationParams,
    generate_everything,
    lowres_to_masks,
)
from maskteacher.viz.cached_teacher import open_teacher_cache, teacher_masks_original
from maskteacher.viz.panels import safe_file_name, save_overlay

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "val",
    overlays: int = 4,
    limit: int | None = None,
    device: str | None = None,
) -> DatasetMetrics:
    """Evaluate one student checkpoint; writes metrics.json, per_image.csv and overlays into ``out``.

    checkpoint: a training checkpoint (last.pt / best.pt) or an official flat state_dict for
    ``cfg.model.type``. split: "val" (dataset.val_dataset) or "train" (dataset.train_dataset).
    """
    dataset = _open_split(cfg, split)
    image_size = cfg.model.image_size
    dev = resolve_device(device or cfg.train.device, key="train.device")
    model = build_sam(
        cfg.model.type, checkpoint, image_size=image_size, strict=cfg.model.strict
    ).to(dev)
    model.eval()
    settings = GenerationParams.from_config(cfg.precompute)
    teacher = _same_images(
        open_teacher_cache(cfg.mask_teacher.cache_path, split, image_size), dataset, split
    )
    teacher_ids = set(teacher.image_ids) if teacher is not None else set()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    acc = MetricsAccumulator()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(range(count), desc=f"eval {split}", unit="img", dynamic_ncols=True)
    for index in bar:
        sample = dataset[index]
        result, input_hw = _evaluate_image(model, sample, image_size, settings, dev)
        if teacher is not None:
            result.teacher_masks = teacher_masks_original(
                teacher,
                teacher_ids,
                sample.image_id,
                image_size=image_size,
                input_hw=input_hw,
                orig_hw=sample.image.shape[:2],
            )
        row = acc.add(result)
        if index < overlays:
            _save_overlay(out, sample.image, result)
        bar.set_postfix(iou=f"{row.mean_best_iou:.3f}", masks=row.num_pred)
    metrics = acc.finish()
    _write_outputs(out, metrics, cfg=cfg, checkpoint=checkpoint, split=split, settings=settings)
    return metrics


def _open_split(cfg: Config, split: str):
    """The dataset of ``split`` ("val" or "train"); UserError when unset or empty."""
    data_path = {"val": cfg.dataset.val_dataset, "train": cfg.dataset.train_dataset}.get(split)
    if split not in ("val", "train"):
        raise UserError(f"--split: got {split!r}; allowed: 'val', 'train'")
    if not data_path:
        raise UserError(f"dataset.{split}_dataset is not set: nothing to evaluate")
    dataset = open_dataset(
        data_path,
        cfg.dataset.format,
        skip_bad=cfg.dataset.skip_bad,
        image_root=cfg.dataset.image_root,
        include_crowd=cfg.dataset.include_crowd,
    )
    if len(dataset) == 0:
        raise UserError(f"{data_path}: the dataset has no images")
    return dataset


def _evaluate_image(
    model, sample, image_size: int, settings: GenerationParams, dev: torch.device
) -> tuple[ImageResult, tuple[int, int]]:
    """The student's everything-mode masks of one sample (original frame) against its ground
    truth, and the resized image's (h, w) in the input frame; ``seconds`` times generation and
    upscaling only (synchronised on CUDA)."""
    orig_hw = sample.image.shape[:2]
    image, input_hw = to_model_input(sample.image, image_size)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    result = generate_everything(
        model, image[None].to(dev), [input_hw], [orig_hw], **settings.generator_kwargs()
    )[0]
    masks = lowres_to_masks(
        result.logits, image_size=image_size, input_hw=input_hw, orig_hw=orig_hw
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    scored = ImageResult(
        image_id=sample.image_id,
        pred_masks=masks.cpu().numpy(),
        pred_scores=result.iou.float().cpu().numpy(),
        gt_masks=np.asarray(sample.masks, bool),
        seconds=seconds,
    )
    return scored, input_hw


def _save_overlay(out: Path, image: np.ndarray, result: ImageResult) -> None:
    gt, student, teacher = result.gt_masks, result.pred_masks, result.teacher_masks
    save_overlay(
        out / "overlays" / f"{safe_file_name(result.image_id)}.png",
        image,
        gt,
        student,
        teacher,
        captions={
            "ground truth": f"ground truth ({len(gt)})",
            "student": f"student ({len(student)})",
            "teacher": f"teacher ({0 if teacher is None else len(teacher)})",
        },
    )


def _same_images(teacher: CacheReader | None, dataset, split: str) -> CacheReader | None:
    """The cache reader when its ``split`` was made from the dataset being evaluated (same
    dataset fingerprint); None, with a warning, when it was made from other images -- image
    ids alone can coincide across datasets (``sample_0000``) and would compare other pictures."""
    if teacher is None:
        return None
    have = teacher.header.fingerprints.get(split)
    want = dataset_fingerprint(dataset.fingerprint_entries())
    if have is not None and have != want:
        log.warning(
            "the teacher cache's '%s' split was made from other images than %s (dataset "
            "fingerprint %s, expected %s): no teacher agreement, no teacher panel",
            split,
            dataset.root,
            have,
            want,
        )
        return None
    return teacher


def _json_number(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_outputs(
    out: Path,
    metrics: DatasetMetrics,
    *,
    cfg: Config,
    checkpoint,
    split: str,
    settings: GenerationParams,
) -> None:
    summary = {k: _json_number(v) for k, v in metrics.summary().items()}
    payload = {
        **summary,
        "split": split,
        "checkpoint": str(checkpoint),
        "model_type": cfg.model.type,
        "image_size": cfg.model.image_size,
        "generation": asdict(settings),
        "teacher_cache": cfg.mask_teacher.cache_path,
    }
    _atomic_text(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    fields = [
        "image_id",
        "num_gt",
        "num_pred",
        "mean_best_iou",
        "boundary_iou",
        "ms",
        "teacher_agreement",
    ]
    tmp = out / "per_image.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in metrics.per_image:
            writer.writerow({k: _json_number(v) for k, v in asdict(row).items()})
    tmp.replace(out / "per_image.csv")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
