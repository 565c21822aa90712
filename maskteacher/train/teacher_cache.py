"""Teacher caches at train time: checking a cache against the config, reading extra teachers.

:func:`check_cache_identity` refuses a cache made by another teacher or with other generation
settings than the config describes -- teacher type, checkpoint sha256 (only when the checkpoint
file is present: training from a cache needs no weights), image size and the everything-mode
parameters of the ``precompute`` section that change the cache's content
(:data:`GENERATION_KEYS`; ``points_per_batch`` and ``bf16`` only change how the work is done).
The error is one line naming the field, the cache's value and the config key with its value.

:class:`CacheTeacherReader` reads one feature-distillation teacher (a ``teachers[]`` entry with
its own cache) for the images of a batch in the training process; the mask teacher's outputs
come with the batch instead (DataLoader workers, :mod:`maskteacher.train.cache_targets`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheReader,
    decode_many,
    open_cache,
)
from maskteacher.errors import UserError
from maskteacher.models import sha256_file
from maskteacher.train.batch import TeacherTargets
from maskteacher.train.cache_targets import _teacher_from_record

log = logging.getLogger(__name__)

#: Generation parameters (``precompute.<key>`` = cache header ``params.<key>``) a cache must match.
GENERATION_KEYS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "max_masks_per_image",
    "multimask_output",
)


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


def generation_params(precompute: Any) -> dict[str, Any]:
    """The :data:`GENERATION_KEYS` values of a ``precompute`` config section."""
    return {key: getattr(precompute, key) for key in GENERATION_KEYS}


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
    if header.teacher_type != identity.teacher_type:
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
        if key not in header.params:
            raise UserError(
                f"{identity.where} {path}: the cache records no generation parameter {key!r} "
                f"(the config has precompute.{key} = {want!r}); {fix}"
            )
        have = header.params[key]
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
            _teacher_from_record(rec, self.fields, self.scale).to(device, non_blocking=True)
            for rec in records
        ]
