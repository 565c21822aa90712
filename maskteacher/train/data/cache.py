"""The mask teacher's cache as the training data's target source: low-res ground truth (and,
when the run needs them, teacher outputs) read from the cache, so no annotation is decoded.

:func:`open_cache_targets` opens the cache for one split and checks that it belongs to the
dataset being trained on: same ``image_size``, same dataset fingerprint, every image present
(images the precompute run recorded as failed are left out of training with one warning; any
other missing image is an error), the stored parts the requested teacher fields need, and --
for the mask-teacher methods -- that most images have teacher masks at all. Each failure is one
line naming what differs.

The fast path: DataLoader workers fetch the compressed chunk bytes of the fields the run needs
only, decode the small ones (bit-packed ground truth, teacher points and scores: the prompts are
drawn there) and pass the large ones on compressed (:meth:`CacheTargets.fetch`): teacher logits
-- ~6.5 MB decoded, ~0.2 MB stored for 100 masks at 1024 --, embeddings and tokens. The main
process decodes a whole batch's large fields at once, in threads (:meth:`CacheTargets.finish`,
zstd releases the GIL). Teacher logits stay in the stored dtype (int8 codes or fp16) with their scale;
:meth:`TeacherTargets.float_logits` dequantises on the device. With ``verify`` every shard's
checksums are checked lazily, the first time a process reads from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheReader,
    RawRecord,
    dataset_fingerprint,
    decode_many,
    decode_raw,
    open_cache,
    split_raw,
)
from maskteacher.cache_format.schema import EMBEDDING, TEACHER_LOGITS, TEACHER_TOKENS
from maskteacher.data import FINGERPRINT_MISMATCH_HINT
from maskteacher.data.dataset import Sample, SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.train.data.batch import TeacherTargets
from maskteacher.train.data.dataset import Targets
from maskteacher.train.data.teacher_cache import RECORD_FIELDS, teacher_from_record

log = logging.getLogger(__name__)

WHERE = "mask_teacher.cache_path"
#: Arrays passed from the workers still compressed (the bulk of a record's bytes), and the
#: teacher fields they hold.
LARGE_ARRAYS = {TEACHER_LOGITS, EMBEDDING, TEACHER_TOKENS}
LARGE_FIELDS = frozenset({"logits", "embedding", "tokens"})

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


def cache_has_split(path: str, split: str) -> bool:
    """Whether the cache at ``path`` lists ``split`` (raises CacheError if it is not a cache)."""
    manifest = open_cache(path).manifest
    return split in manifest.header.fingerprints or any(s.split == split for s in manifest.shards)


@dataclass
class CacheTargets:
    """Target source reading ``reader`` (one split); ``positions[i]`` is the cache item of
    dataset image ``i`` (-1: not used for training). cache_ids: the cache's id, then the id it
    had before a ``cache upgrade`` (a checkpoint made with either resumes)."""

    reader: CacheReader
    positions: np.ndarray
    teacher_fields: frozenset[str]
    logit_scale: float
    cache_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        self.record_fields = ["gt_masks", *(RECORD_FIELDS[f] for f in sorted(self.teacher_fields))]

    @property
    def cache_id(self) -> str:
        return self.cache_ids[0]

    @property
    def usable_indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.positions >= 0)]

    def fetch(self, index: int, sample: Sample, input_hw: tuple[int, int]) -> Targets:
        """In a DataLoader worker: the image's ground truth and small teacher fields, decoded;
        the large ones (logits, embedding, tokens) stay compressed in ``pending``."""
        position = int(self.positions[index])
        if position < 0:
            raise IndexError(f"image {sample.image_id!r} is not in the cache")
        raw = self.reader.read_raw(position, fields=self.record_fields)
        if tuple(raw.input_hw) != tuple(input_hw):
            raise UserError(
                f"cache image {raw.image_id!r}: input size {tuple(raw.input_hw)} differs from "
                f"the dataset image's {tuple(input_hw)} (orig {sample.orig_hw}); the image file "
                "changed"
            )
        small, large = split_raw(raw, LARGE_ARRAYS)
        record = decode_raw(small)
        gt = torch.from_numpy(np.ascontiguousarray(record.gt_masks, dtype=np.bool_))
        teacher = None
        if self.teacher_fields:
            teacher = teacher_from_record(record, self.teacher_fields, self.logit_scale)
        return Targets(gt_masks=gt, teacher=teacher, pending=large if large.wanted else None)

    def finish(self, pending: list[RawRecord]) -> list[TeacherTargets]:
        """In the main process: decode the large fields of a batch (threads) -- a
        :class:`TeacherTargets` holding just them per image."""
        fields = self.teacher_fields & LARGE_FIELDS
        return [
            teacher_from_record(record, fields, self.logit_scale)
            for record in decode_many(pending, threads=2)
        ]


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
    empty_teacher_limit: float | None = None,
) -> CacheTargets:
    """Open ``path`` for ``split`` of ``images`` and check it fits (see the module docstring).

    verify: check each shard's checksums the first time a process reads from it (a corrupt
    shard is a CacheError naming it); empty_teacher_limit: refuse the cache when more than this
    fraction of the used images have no teacher mask (None: not checked).
    """
    unknown = sorted(set(teacher_fields) - set(TEACHER_FIELD_STORE))
    if unknown:
        raise ValueError(f"unknown teacher fields: {', '.join(unknown)}")  # programming error
    reader = open_cache(path, split=split, verify_shards=verify)
    header = reader.header
    _check_header(header, path=path, split=split, images=images, image_size=image_size)
    check_store(header, frozenset(teacher_fields), where=WHERE, path=path)
    positions = _positions(reader, images, path=path, split=split)
    if empty_teacher_limit is not None:
        _check_teacher_masks(reader, positions[positions >= 0], path, empty_teacher_limit)
    upgraded = (reader.manifest.upgraded_from or {}).get("cache_id")
    return CacheTargets(
        reader=reader,
        positions=positions,
        teacher_fields=frozenset(teacher_fields),
        logit_scale=header.codec.scale,
        cache_ids=(reader.cache_id, upgraded) if upgraded else (reader.cache_id,),
    )


def _check_header(
    header: CacheHeader, *, path: str, split: str, images: SegmentationDataset, image_size: int
) -> None:
    """Refuse a cache of another image size, without ground truth, or of other data."""
    if header.image_size != image_size:
        raise UserError(
            f"{WHERE} {path}: cache was made at image_size {header.image_size}, the config "
            f"trains at model.image_size {image_size}; use a matching cache"
        )
    if not header.store.gt:
        raise UserError(
            f"{WHERE} {path}: the cache holds no ground truth (made with precompute.store.gt: "
            "false); the trainer reads ground truth from it"
        )
    want = dataset_fingerprint(images.fingerprint_entries())
    have = header.fingerprints.get(split)
    if have != want:
        raise UserError(
            f"{WHERE} {path}: dataset fingerprint of split {split!r} is {have} in the cache but "
            f"{want} for {images.root}: {FINGERPRINT_MISMATCH_HINT}"
        )


def _positions(
    reader: CacheReader, images: SegmentationDataset, *, path: str, split: str
) -> np.ndarray:
    """(N,) int64 cache item of each dataset image (-1: failed in precompute, left out with one
    warning); an image missing for any other reason is an error."""
    try:
        positions = reader.positions_of(images.image_ids, split=split)
    except CacheError as exc:
        raise UserError(f"{WHERE} {path}: {exc}") from None
    absent = [images.image_ids[i] for i in np.flatnonzero(positions < 0)]
    failed = {f.image_id for f in reader.manifest.failures if f.split == split}
    missing = [i for i in absent if i not in failed]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(
            f"{WHERE} {path}: {len(missing)} of the {len(images)} {split} images are not in the "
            f"cache ({shown}); finish or re-run precompute for this dataset"
        )
    if absent:
        log.warning(
            "%d %s images failed in precompute and are left out of training (e.g. %s)",
            len(absent),
            split,
            absent[0],
        )
    if not (positions >= 0).any():
        raise UserError(f"{WHERE} {path}: no {split} image of the dataset is usable")
    return positions


def _check_teacher_masks(reader: CacheReader, used: np.ndarray, path: str, limit: float) -> None:
    """Refuse a cache whose teacher kept no mask on more than ``limit`` of the used images
    (thresholds too strict for the teacher): the mask-teacher methods would train on nothing."""
    counts = reader.teacher_counts(used)
    empty = float((counts == 0).mean()) if counts.size else 1.0
    if empty > limit:
        raise UserError(
            f"{WHERE} {path}: the teacher kept no mask on {empty:.0%} of the {counts.size} images "
            f"(more than {limit:.0%}): the mask-teacher method would train on nothing -- lower "
            "precompute.pred_iou_thresh / precompute.stability_score_thresh and re-run "
            "precompute, or set mask_teacher.allow_empty_teacher: true"
        )
