"""Ground truth (and teacher outputs) for training, read from the teacher cache.

:func:`open_cache_targets` opens the cache for one split and checks that it belongs to the
dataset being trained on: same ``image_size``, same dataset fingerprint, every image present
(images the precompute run recorded as failed are left out of training with one warning; any
other missing image is an error), and the stored parts the requested teacher fields need. Each
failure is one line naming what differs.

Reading happens in DataLoader workers (the reader reopens its files per process). Teacher
logits stay in the stored dtype (int8 codes or fp16) with their scale, so a worker hands the
main process a quarter of the bytes; :meth:`TeacherTargets.float_logits` dequantises on the
device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheReader,
    dataset_fingerprint,
    open_cache,
)
from maskteacher.cache_format.verify import verify_cache
from maskteacher.data.dataset import Sample, SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.train.batch import TeacherTargets
from maskteacher.train.data import Targets

log = logging.getLogger(__name__)

#: Teacher fields a strategy may ask for -> the ``precompute.store`` flag that provides it.
TEACHER_FIELD_STORE = {
    "logits": "teacher",
    "points": "teacher",
    "iou": "teacher",
    "stability": "teacher",
    "boxes": "teacher",
    "embedding": "embedding",
    "tokens": "tokens",
}


def cache_id(reader: CacheReader) -> str:
    """A short stable id of a cache's manifest (sha256 of its canonical JSON)."""
    text = json.dumps(reader.manifest.to_json(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_has_split(path: str, split: str) -> bool:
    """Whether the cache at ``path`` lists ``split`` (raises CacheError if it is not a cache)."""
    manifest = open_cache(path).manifest
    return split in manifest.header.fingerprints or any(s.split == split for s in manifest.shards)


@dataclass
class CacheTargets:
    """Target source reading ``reader`` (one split); ``positions[i]`` is the cache item of
    dataset image ``i`` (None: not used for training)."""

    reader: CacheReader
    positions: list[int | None]
    teacher_fields: frozenset[str]
    logit_scale: float
    cache_id: str

    @property
    def usable_indices(self) -> list[int]:
        return [i for i, p in enumerate(self.positions) if p is not None]

    def targets(self, index: int, sample: Sample, input_hw: tuple[int, int]) -> Targets:
        position = self.positions[index]
        if position is None:
            raise IndexError(f"image {sample.image_id!r} is not in the cache")
        record = self.reader[position]
        if tuple(int(v) for v in record.input_hw) != tuple(input_hw):
            raise UserError(
                f"cache image {record.image_id!r}: input size {tuple(record.input_hw)} differs from "
                f"the dataset image's {tuple(input_hw)} (orig {sample.orig_hw}); the image file changed"
            )
        gt = torch.from_numpy(np.ascontiguousarray(record.gt_masks, dtype=np.bool_))
        teacher = None
        if self.teacher_fields:
            teacher = _teacher_from_record(record, self.teacher_fields, self.logit_scale)
        return Targets(gt_masks=gt, teacher=teacher)


def _teacher_from_record(record, fields: frozenset[str], scale: float) -> TeacherTargets:
    def tensor(name: str, value):
        return torch.from_numpy(np.ascontiguousarray(value)) if name in fields else None

    return TeacherTargets(
        logits=tensor("logits", record.teacher_logits),
        logit_scale=scale,
        points=tensor("points", record.teacher_points),
        iou=tensor("iou", record.teacher_iou),
        stability=tensor("stability", record.teacher_stability),
        boxes=tensor("boxes", record.teacher_boxes),
        embedding=None if record.embedding is None else tensor("embedding", record.embedding),
        tokens=None if record.tokens is None else tensor("tokens", record.tokens),
    )


def check_store(header: CacheHeader, fields: frozenset[str], *, where: str, path: str) -> None:
    """Refuse a cache that lacks a stored part one of ``fields`` needs, naming the store flag."""
    for name in sorted(fields):
        flag = TEACHER_FIELD_STORE[name]
        if not getattr(header.store, flag):
            raise UserError(
                f"{where} {path}: the config needs teacher {name}, which the cache lacks; "
                f"re-run precompute with precompute.store.{flag}: true"
            )


def open_cache_targets(
    path: str,
    *,
    split: str,
    images: SegmentationDataset,
    image_size: int,
    teacher_fields: frozenset[str] = frozenset(),
    verify: bool = False,
    progress: bool = False,
) -> CacheTargets:
    """Open ``path`` for ``split`` of ``images`` and check it fits (see the module docstring).

    verify: first recompute every shard checksum and decode every image
    (:func:`maskteacher.cache_format.verify.verify_cache`); any problem is a UserError naming
    the first one.
    """
    unknown = sorted(set(teacher_fields) - set(TEACHER_FIELD_STORE))
    if unknown:
        raise ValueError(f"unknown teacher fields: {', '.join(unknown)}")  # programming error
    if verify:
        report = verify_cache(path, progress=progress)
        if not report.ok:
            raise UserError(
                f"mask_teacher.cache_path {path}: cache verification found "
                f"{len(report.problems)} problem(s), the first: {report.problems[0]}"
            )
    reader = open_cache(path, split=split)
    header = reader.header
    if header.image_size != image_size:
        raise UserError(
            f"mask_teacher.cache_path {path}: cache was made at image_size {header.image_size}, "
            f"the config trains at model.image_size {image_size}; use a matching cache"
        )
    if not header.store.gt:
        raise UserError(
            f"mask_teacher.cache_path {path}: the cache holds no ground truth (made with "
            "precompute.store.gt: false); the trainer reads ground truth from it"
        )
    check_store(header, frozenset(teacher_fields), where="mask_teacher.cache_path", path=path)
    want = dataset_fingerprint(images.fingerprint_entries())
    have = header.fingerprints.get(split)
    if have != want:
        raise UserError(
            f"mask_teacher.cache_path {path}: dataset fingerprint of split {split!r} is {have} in "
            f"the cache but {want} for {images.root} (the cache was made for other data, or the "
            "data changed since)"
        )
    failed = {f.image_id for f in reader.manifest.failures if f.split == split}
    by_id = {image_id: i for i, image_id in enumerate(reader.image_ids)}
    positions: list[int | None] = []
    missing, skipped = [], []
    for image_id in images.image_ids:
        pos = by_id.get(image_id)
        if pos is None:
            (skipped if image_id in failed else missing).append(image_id)
        positions.append(pos)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(
            f"mask_teacher.cache_path {path}: {len(missing)} of the {len(images)} {split} images "
            f"are not in the cache ({shown}); finish or re-run precompute for this dataset"
        )
    if skipped:
        log.warning(
            "%d %s images failed in precompute and are left out of training (e.g. %s)",
            len(skipped),
            split,
            skipped[0],
        )
    if all(p is None for p in positions):
        raise UserError(
            f"mask_teacher.cache_path {path}: no {split} image of the dataset is usable"
        )
    try:
        scale = header.codec.scale
    except CacheError as exc:  # pragma: no cover - header validated on open
        raise UserError(str(exc)) from None
    return CacheTargets(
        reader=reader,
        positions=positions,
        teacher_fields=frozenset(teacher_fields),
        logit_scale=scale,
        cache_id=cache_id(reader),
    )
