"""The teacher cache at train time: ground truth and teacher outputs read from it, and checks.

:func:`open_cache_targets` opens the cache for one split and checks that it belongs to the
dataset being trained on: same ``image_size``, same dataset fingerprint, every image present
(images the precompute run recorded as failed are left out of training with one warning; any
other missing image is an error), and the stored parts the requested teacher fields need. Each
failure is one line naming what differs. Reading happens in DataLoader workers (the reader
reopens its files per process). Teacher logits stay in the stored dtype (int8 codes or fp16)
with their scale, so a worker hands the main process a quarter of the bytes;
:meth:`TeacherTargets.float_logits` dequantises on the device.

:func:`check_cache_identity` refuses a cache made by another teacher or with other generation
settings than the config describes -- teacher type, checkpoint sha256 (only when the checkpoint
file is present: training from a cache needs no weights), image size and the everything-mode
parameters that change the cache's content (:data:`GENERATION_KEYS`; ``points_per_batch`` and
``bf16`` only change how the work is done). The error is one line naming the field, the cache's
value and the config key with its value.

:class:`CacheTeacherReader` reads one feature-distillation teacher (a ``teachers[]`` entry with
its own cache) for the images of a batch in the training process; the mask teacher's outputs
come with the batch instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheReader,
    dataset_fingerprint,
    decode_many,
    open_cache,
)
from maskteacher.cache_format.verify import verify_cache
from maskteacher.data import FINGERPRINT_MISMATCH_HINT
from maskteacher.data.dataset import Sample, SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.models import HQ_VARIANTS, sha256_file
from maskteacher.models.hq import built_teacher_type
from maskteacher.train.data.batch import TeacherTargets
from maskteacher.train.data.dataset import Targets

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
            teacher = teacher_from_record(record, self.teacher_fields, self.logit_scale)
        return Targets(gt_masks=gt, teacher=teacher)


def teacher_from_record(record, fields: frozenset[str], scale: float) -> TeacherTargets:
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
    _check_header(header, path=path, split=split, images=images, image_size=image_size)
    check_store(header, frozenset(teacher_fields), where="mask_teacher.cache_path", path=path)
    positions = _positions(reader, images, path=path, split=split)
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


def _check_header(
    header: CacheHeader, *, path: str, split: str, images: SegmentationDataset, image_size: int
) -> None:
    """Refuse a cache of another image size, without ground truth, or of other data."""
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
    want = dataset_fingerprint(images.fingerprint_entries())
    have = header.fingerprints.get(split)
    if have != want:
        raise UserError(
            f"mask_teacher.cache_path {path}: dataset fingerprint of split {split!r} is {have} in "
            f"the cache but {want} for {images.root}: {FINGERPRINT_MISMATCH_HINT}"
        )


def _positions(
    reader: CacheReader, images: SegmentationDataset, *, path: str, split: str
) -> list[int | None]:
    """The cache item of each dataset image (None: failed in precompute, left out with one
    warning); an image missing for any other reason is an error."""
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
    return positions


# ----------------------------------------------------------------------------- teacher caches

#: Generation parameters (``precompute.<key>`` = cache header ``params.<key>``) a cache must match.
GENERATION_KEYS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "max_masks_per_image",
    "multimask_output",
    "strategy",
)

#: What a :data:`GENERATION_KEYS` parameter a cache does not record means: caches made before
#: ``strategy`` existed decoded the whole grid, and later ones record it only when not ``grid``.
ABSENT_MEANS = {"strategy": "grid"}


@dataclass(frozen=True)
class TeacherIdentity:
    """What a teacher cache must have been made with, and the config keys that say so.

    where: the config key naming the cache (``mask_teacher.cache_path``); type_key /
    checkpoint_key: the config keys of teacher_type / checkpoint; generation: GENERATION_KEYS
    values of the ``precompute`` section.
    """

    where: str
    teacher_type: str
    type_key: str
    checkpoint: str | None
    checkpoint_key: str
    image_size: int
    generation: dict[str, Any]


#: Generation parameters a cache records only for some teachers (SAM-HQ's ``hq_token_only``) or
#: strategies (the hierarchical strategy's); compared when the cache records them.
OPTIONAL_GENERATION_KEYS = ("hq_token_only", "hierarchical_stride", "hierarchical_logit_thresh")


def generation_params(precompute: Any) -> dict[str, Any]:
    """The :data:`GENERATION_KEYS` (and :data:`OPTIONAL_GENERATION_KEYS`) values of a
    ``precompute`` config section."""
    keys = GENERATION_KEYS + OPTIONAL_GENERATION_KEYS
    return {key: getattr(precompute, key) for key in keys if hasattr(precompute, key)}


def _teacher_type_matches(header: CacheHeader, identity: TeacherIdentity) -> bool:
    """The cache's teacher type is the one the config builds: the SAM-HQ variant for a SAM type
    and a SAM-HQ checkpoint (the spec's ``vit_h`` + ``sam_hq_vit_h.pth``). Without the
    checkpoint file the configured backbone's SAM-HQ variant is accepted too (the file is what
    would tell SAM from SAM-HQ), with one log line."""
    ckpt = identity.checkpoint
    if ckpt is not None and Path(ckpt).is_file():
        return header.teacher_type == built_teacher_type(identity.teacher_type, ckpt)
    if header.teacher_type == identity.teacher_type:
        return True
    if header.teacher_type == HQ_VARIANTS.get(identity.teacher_type):
        log.info(
            "%s: the cache was made by %s, the SAM-HQ variant of %s = %s (no checkpoint file to "
            "tell them apart)",
            identity.where,
            header.teacher_type,
            identity.type_key,
            identity.teacher_type,
        )
        return True
    return False


def _same(have: Any, want: Any) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(have) and number(want):
        return float(have) == float(want)
    return have == want


def open_teacher_cache(path: str, *, where: str) -> CacheReader:
    """Open a finished cache; any CacheError becomes one UserError line naming the config key."""
    try:
        return open_cache(path)
    except CacheError as exc:
        raise UserError(f"{where} {path}: {exc}") from None


def check_cache_identity(path: str, identity: TeacherIdentity) -> CacheHeader:
    """Refuse the cache at ``path`` unless it was made as ``identity`` says (module docstring)."""
    header = open_teacher_cache(path, where=identity.where).header
    prefix = f"{identity.where} {path}: the cache was made with"
    fix = "precompute a cache with this config (maskteacher precompute) or fix the config"
    if not _teacher_type_matches(header, identity):
        raise UserError(
            f"{prefix} teacher_type {header.teacher_type!r}, but the config has "
            f"{identity.type_key} = {identity.teacher_type!r}; {fix}"
        )
    if header.image_size != identity.image_size:
        raise UserError(
            f"{prefix} image_size {header.image_size}, but the config has model.image_size = "
            f"{identity.image_size}; {fix}"
        )
    for key, want in identity.generation.items():
        if key in OPTIONAL_GENERATION_KEYS and key not in header.params:
            continue
        if key not in header.params and key not in ABSENT_MEANS:
            raise UserError(
                f"{identity.where} {path}: the cache records no generation parameter {key!r} "
                f"(the config has precompute.{key} = {want!r}); {fix}"
            )
        have = header.params.get(key, ABSENT_MEANS.get(key))
        if not _same(have, want):
            raise UserError(
                f"{prefix} {key} = {have!r}, but the config has precompute.{key} = {want!r}; {fix}"
            )
    ckpt = identity.checkpoint
    if ckpt is not None and Path(ckpt).is_file():
        digest = sha256_file(ckpt)
        if header.checkpoint_sha256 != digest:
            raise UserError(
                f"{prefix} a teacher checkpoint of sha256 {header.checkpoint_sha256[:16]}..., but "
                f"{identity.checkpoint_key} {ckpt} has sha256 {digest[:16]}...; {fix}"
            )
    elif ckpt is not None:
        what = identity.checkpoint_key
        log.info("%s %s not found: the cache's teacher weights are not checked", what, ckpt)
    return header


class CacheTeacherReader:
    """Teacher outputs of one cache for the images of a batch, read in the training process.

    reader: the opened cache; fields: teacher fields to return; split: the split read;
    where: the config key naming the cache (for errors). Images are looked up by id.
    """

    def __init__(self, reader: CacheReader, *, fields: frozenset[str], split: str, where: str):
        self.reader = reader
        self.fields = frozenset(fields)
        self.split = split
        self.where = where
        self.scale = reader.header.codec.scale

    def __call__(self, image_ids: list[str], device: torch.device) -> list[TeacherTargets]:
        """B :class:`TeacherTargets` (only ``fields`` set) on ``device``."""
        raws = []
        for image_id in image_ids:
            try:
                raws.append(self.reader.read_raw(self.reader.index_of(image_id, self.split)))
            except CacheError as exc:
                raise UserError(f"{self.where}: {exc}") from None
        records = decode_many(raws, threads=2)
        return [
            teacher_from_record(rec, self.fields, self.scale).to(device, non_blocking=True)
            for rec in records
        ]
