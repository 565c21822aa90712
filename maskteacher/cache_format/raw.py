"""Compressed records: what a DataLoader worker fetches, and the decode the main process runs.

``reader.read_raw(i, fields=...)`` returns a :class:`RawRecord`: the stored chunk bytes of the
arrays holding the requested fields (~0.2 MB per image of 100 int8 masks, cheap to pass between
processes) plus the image's metadata from the index. :func:`decode_raw` (one record) and
:func:`decode_many` (a batch, on a few threads: zstd releases the GIL) check every chunk's
checksum and decompress into a :class:`~maskteacher.cache_format.schema.CacheRecord` (numpy).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from maskteacher.cache_format.codecs import ChunkError, unpack_masks
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.layout import ArraySpec
from maskteacher.cache_format.schema import (
    EMBEDDING,
    FIELD_ARRAY,
    GT_MASKS,
    TEACHER_LOGITS,
    TEACHER_META,
    TEACHER_TOKENS,
    CacheRecord,
    empty_teacher,
    unpack_meta,
)

#: Record fields stored in row arrays (what ``fields=`` may name).
ARRAY_FIELDS = tuple(FIELD_ARRAY)


@dataclass
class RawField:
    """The stored chunks of one array for one image: ``blob[a:b]`` for each chunk's span."""

    spec: ArraySpec
    count: int
    blob: bytes
    spans: list[tuple[int, int]]


@dataclass
class RawRecord:
    """Compressed form of one :class:`CacheRecord` (picklable; decode with :func:`decode_raw`).

    ``fields``: the fetched arrays; ``wanted``: the record fields asked for (the others decode
    to None; asked-for fields the cache does not store decode as today: empty teacher arrays,
    empty ground truth, None for embedding / tokens).
    """

    image_id: str
    split: str
    shard: str
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]
    source: str | None
    low_res: int
    logit_dtype: str
    fields: dict[str, RawField]
    wanted: frozenset[str] = frozenset(ARRAY_FIELDS)

    @property
    def nbytes(self) -> int:
        return sum(len(f.blob) for f in self.fields.values())


def arrays_for(fields: frozenset[str]) -> set[str]:
    """The arrays holding record ``fields`` (ValueError naming an unknown field)."""
    unknown = sorted(set(fields) - set(ARRAY_FIELDS))
    if unknown:
        raise ValueError(f"unknown record fields {unknown}; known: {', '.join(ARRAY_FIELDS)}")
    return {FIELD_ARRAY[f] for f in fields}


def split_raw(raw: RawRecord, arrays: set[str]) -> tuple[RawRecord, RawRecord]:
    """``raw`` as two records: the fields outside ``arrays`` (array names) and those inside, each
    decoding to just its own fields -- e.g. a DataLoader worker decodes the small parts and
    passes the big logit chunks on compressed."""
    inside = {f for f in raw.wanted if FIELD_ARRAY[f] in arrays}
    keep = {n: f for n, f in raw.fields.items() if n not in arrays}
    moved = {n: f for n, f in raw.fields.items() if n in arrays}
    return (
        dataclasses.replace(raw, fields=keep, wanted=frozenset(raw.wanted - inside)),
        dataclasses.replace(raw, fields=moved, wanted=frozenset(inside)),
    )


def decode_raw(raw: RawRecord) -> CacheRecord:
    """Check and decompress a :class:`RawRecord`; CacheError naming shard and image on failure."""
    arrays = {name: _decode_field(raw, name, f) for name, f in raw.fields.items()}
    low = raw.low_res
    values: dict[str, np.ndarray | None] = empty_teacher(low, np.dtype(raw.logit_dtype))
    values["gt_masks"] = np.zeros((0, low, low), np.bool_)
    values["embedding"] = values["tokens"] = None
    if TEACHER_LOGITS in arrays:
        values["teacher_logits"] = arrays[TEACHER_LOGITS]
    if TEACHER_META in arrays:
        values.update(unpack_meta(arrays[TEACHER_META]))
    if GT_MASKS in arrays:
        values["gt_masks"] = unpack_masks(arrays[GT_MASKS], low)
    if EMBEDDING in arrays:
        values["embedding"] = arrays[EMBEDDING][0]
    if TEACHER_TOKENS in arrays:
        values["tokens"] = arrays[TEACHER_TOKENS]
    for name in ARRAY_FIELDS:
        if name not in raw.wanted:
            values[name] = None
    return CacheRecord(
        image_id=raw.image_id,
        split=raw.split,
        orig_hw=np.asarray(raw.orig_hw, np.int64),
        input_hw=np.asarray(raw.input_hw, np.int64),
        source=raw.source,
        **values,
    )


def decode_many(raws: list[RawRecord], *, threads: int = 2) -> list[CacheRecord]:
    """Decode several raw records, ``threads`` at a time (zstd releases the GIL, so a batch
    decodes in parallel inside one process); order is kept."""
    if threads <= 1 or len(raws) <= 1:
        return [decode_raw(r) for r in raws]
    global _POOL
    if _POOL is None or _POOL[0] != (os.getpid(), threads):
        _POOL = (
            (os.getpid(), threads),
            ThreadPoolExecutor(threads, thread_name_prefix="cache-decode"),
        )
    return list(_POOL[1].map(decode_raw, raws))


_POOL: tuple[tuple[int, int], ThreadPoolExecutor] | None = None


def _decode_field(raw: RawRecord, name: str, f: RawField) -> np.ndarray:
    """Decode a field's chunks into an array of exactly ``count`` rows (the padding rows of the
    last chunk go to a small per-thread scratch buffer and are dropped)."""
    spec = f.spec
    k = spec.chunk_rows
    out = np.empty((f.count, *spec.row_shape), np.dtype(spec.dtype))
    blob = memoryview(f.blob)
    for j, (a, b) in enumerate(f.spans):
        rows = min(k, f.count - j * k)
        target = out[j * k : j * k + rows] if rows == k else _scratch(spec)
        try:
            spec.codec.decode_into(blob[a:b], target)
        except ChunkError as exc:
            raise CacheError(
                f"shard {raw.shard}: image {raw.image_id!r}: {name} chunk {j} is corrupt ({exc})"
            ) from None
        if rows != k:
            out[j * k :] = target[:rows]
    return out


_SCRATCH = threading.local()


def _scratch(spec: ArraySpec) -> np.ndarray:
    """A reusable chunk-sized buffer for this thread (and process: forked children get a copy)."""
    key = (spec.chunk_shape, spec.dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = np.empty(spec.chunk_shape, np.dtype(spec.dtype))
    return buf
