"""Checking a teacher cache against the config, and reading a distillation teacher's own cache.

:func:`check_cache_identity` refuses a cache made by another teacher or with other settings than
the config describes. What must match is the one list of
:mod:`maskteacher.cache_format.identity` (teacher, checkpoint sha256, image size, logit codec,
the generation parameters -- ``bf16`` included); the teacher type follows SAM-HQ's rule here
(:func:`teacher_type_matches`), and the checkpoint sha256 is compared only when the checkpoint
file is present (training from a cache needs no weights). The error is one line naming the
field, the cache's value and the config key with its value.

:class:`CacheTeacherReader` reads one feature-distillation teacher (a ``teachers[]`` entry with
its own cache) for the images of a batch in the training process; the mask teacher's outputs
come with the batch instead (:mod:`.cache`).

:func:`load_teacher_decoder` gives the prompt-dependent distillation blocks the teacher's prompt
encoder + mask decoder for a cache's embeddings: from the cache itself (``teacher_decoder.npz``,
sha256-checked -- a shared cache is self-contained) or else from the teacher's checkpoint file,
whose sha256 must be the cache header's (a decoder of another teacher would not fit the cached
embeddings). The image encoder is never built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheReader,
    CacheRecord,
    decode_many,
    expectation_mismatch,
    open_cache,
)
from maskteacher.errors import UserError
from maskteacher.models import HQ_TYPES, HQ_VARIANTS, read_state_dict, sha256_file
from maskteacher.models.everything import GenerationParams
from maskteacher.models.hq import built_teacher_type
from maskteacher.models.prompt_decoder import PromptDecoder, load_prompt_decoder
from maskteacher.train.data.batch import TeacherTargets

log = logging.getLogger(__name__)

#: Teacher field -> the cache record field holding it.
RECORD_FIELDS = {
    "logits": "teacher_logits",
    "points": "teacher_points",
    "iou": "teacher_iou",
    "stability": "teacher_stability",
    "boxes": "teacher_boxes",
    "embedding": "embedding",
    "tokens": "tokens",
}


@dataclass(frozen=True)
class TeacherIdentity:
    """What a teacher cache must have been made with, and the config keys that say so.

    where: the config key naming the cache (``mask_teacher.cache_path``); type_key /
    checkpoint_key: the config keys of teacher_type / checkpoint; generation: the ``precompute``
    section's generation settings; codec / clip: ``precompute.codec`` / ``precompute.clip``.
    """

    where: str
    teacher_type: str
    type_key: str
    checkpoint: str | None
    checkpoint_key: str
    image_size: int
    generation: GenerationParams
    codec: str = "int8"
    clip: float = 12.0


def open_teacher_cache(path: str, *, where: str) -> CacheReader:
    """Open a finished cache; any CacheError becomes one UserError line naming the config key."""
    try:
        return open_cache(path)
    except CacheError as exc:
        raise UserError(f"{where} {path}: {exc}") from None


def teacher_type_matches(header: CacheHeader, identity: TeacherIdentity) -> bool:
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


def _config_key(field: str, identity: TeacherIdentity) -> str:
    """The config key behind a :class:`~maskteacher.cache_format.identity.Mismatch` field."""
    if field.startswith("params."):
        return "precompute." + field.removeprefix("params.")
    return {
        "codec.name": "precompute.codec",
        "codec.clip": "precompute.clip",
        "image_size": "model.image_size",
        "checkpoint_sha256": identity.checkpoint_key,
    }.get(field, field)


def check_cache_identity(path: str, identity: TeacherIdentity) -> CacheHeader:
    """Refuse the cache at ``path`` unless it was made as ``identity`` says (module docstring)."""
    header = open_teacher_cache(path, where=identity.where).header
    prefix = f"{identity.where} {path}: the cache was made with"
    fix = "precompute a cache with this config (maskteacher precompute) or fix the config"
    if not teacher_type_matches(header, identity):
        raise UserError(
            f"{prefix} teacher_type {header.teacher_type!r}, but the config has "
            f"{identity.type_key} = {identity.teacher_type!r}; {fix}"
        )
    ckpt, digest = identity.checkpoint, None
    if ckpt is not None and Path(ckpt).is_file():
        digest = sha256_file(ckpt)
    elif ckpt is not None:
        log.info("%s %s not found: the cache's teacher weights are not checked",
                 identity.checkpoint_key, ckpt)  # fmt: skip
    mismatch = expectation_mismatch(
        header,
        teacher_type=None,
        image_size=identity.image_size,
        params=identity.generation.header_params(hq=header.teacher_type in HQ_TYPES),
        codec_name=identity.codec,
        codec_clip=identity.clip,
        checkpoint_sha256=digest,
    )
    if mismatch is None:
        return header
    key = _config_key(mismatch.field, identity)
    if mismatch.field == "checkpoint_sha256":
        raise UserError(
            f"{prefix} a teacher checkpoint of sha256 {str(mismatch.have)[:16]}..., but {key} "
            f"{ckpt} has sha256 {digest[:16]}...; {fix}"
        )
    raise UserError(
        f"{prefix} {mismatch.field.removeprefix('params.')} = {mismatch.have!r}, but the config "
        f"has {key} = {mismatch.want!r}; {fix}"
    )


def teacher_from_record(
    record: CacheRecord, fields: frozenset[str], scale: float
) -> TeacherTargets:
    """The ``fields`` of a decoded record as a :class:`TeacherTargets` of CPU tensors."""

    def tensor(name: str):
        value = getattr(record, RECORD_FIELDS[name])
        if name not in fields or value is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(value))

    return TeacherTargets(
        logits=tensor("logits"),
        logit_scale=scale,
        points=tensor("points"),
        iou=tensor("iou"),
        stability=tensor("stability"),
        boxes=tensor("boxes"),
        embedding=tensor("embedding"),
        tokens=tensor("tokens"),
    )


class CacheTeacherReader:
    """Teacher outputs of one cache for the images of a batch, read in the training process.

    reader: the opened cache; fields: teacher fields to return; split: the split read;
    where: the config key naming the cache (for errors). Images are looked up by id and only
    the arrays of ``fields`` are fetched.
    """

    def __init__(self, reader: CacheReader, *, fields: frozenset[str], split: str, where: str):
        self.reader = reader
        self.fields = frozenset(fields)
        self.record_fields = [RECORD_FIELDS[f] for f in sorted(self.fields)]
        self.split = split
        self.where = where
        self.scale = reader.header.codec.scale

    def __call__(self, image_ids: list[str], device: torch.device) -> list[TeacherTargets]:
        """B :class:`TeacherTargets` (only ``fields`` set) on ``device``."""
        try:
            raws = [
                self.reader.read_raw(
                    self.reader.index_of(image_id, self.split), fields=self.record_fields
                )
                for image_id in image_ids
            ]
            records = decode_many(raws, threads=2)
        except CacheError as exc:
            raise UserError(f"{self.where}: {exc}") from None
        return [
            teacher_from_record(rec, self.fields, self.scale).to(device, non_blocking=True)
            for rec in records
        ]


def load_teacher_decoder(
    reader: CacheReader, *, where: str, checkpoint: str | None, checkpoint_key: str
) -> PromptDecoder:
    """The prompt encoder + mask decoder of the teacher that made the cache ``reader`` (module
    docstring), frozen, in eval mode, on the CPU. where / checkpoint_key: the config keys
    naming the cache and the teacher's checkpoint (for errors); one UserError line when
    neither source has the weights or the checkpoint is another teacher's."""
    header, path = reader.header, reader.source.describe()
    try:
        arrays = reader.decoder_weights()
    except CacheError as exc:
        raise UserError(f"{where}: {exc}") from None
    if arrays is not None:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        source = f"{where} {path}: teacher_decoder.npz"
    elif checkpoint is not None and Path(checkpoint).is_file():
        digest = sha256_file(checkpoint)
        if digest != header.checkpoint_sha256:
            raise UserError(
                f"{checkpoint_key} {checkpoint} has sha256 {digest[:16]}..., but the cache {path} "
                f"was made by the teacher of sha256 {header.checkpoint_sha256[:16]}...: its "
                f"decoder would not fit the cached embeddings; set {checkpoint_key} to the "
                "checkpoint that made the cache"
            )
        state, source = read_state_dict(checkpoint), f"{checkpoint_key} {checkpoint}"
    else:
        have = "not set" if checkpoint is None else f"{checkpoint}, which does not exist"
        raise UserError(
            f"{where} {path}: the prompt-dependent distillation blocks run the teacher's prompt "
            "encoder + mask decoder on the cached embeddings, but the cache holds no "
            f"teacher_decoder.npz (made without precompute.store.embedding, or before it was "
            f"stored) and {checkpoint_key} is {have}; set {checkpoint_key} to the checkpoint "
            "that made the cache, or precompute it again"
        )
    return load_prompt_decoder(header.teacher_type, header.image_size, state, source=source)
