"""Row arrays of a shard and how their chunks are found, shared by both backends.

A *row array* has shape (rows, *row_shape) and is chunked along rows only, ``chunk_rows`` rows
per chunk; images start on chunk boundaries (see schema.py). A backend supplies, for chunk ``j``
of an array, the file and byte range holding its stored bytes (:class:`ChunkLocation`); the
reader fetches those bytes and decodes them with the array's :class:`ChunkCodec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from maskteacher.cache_format.codecs import ChunkCodec, packed_row_bytes
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.schema import (
    EMBEDDING,
    GT_MASKS,
    META_COLUMNS,
    TEACHER_LOGITS,
    TEACHER_META,
    TEACHER_TOKENS,
    CacheHeader,
)

#: Which CSR row space each array uses: per teacher mask, per GT mask, or per image.
ROW_SPACE = {
    TEACHER_LOGITS: "teacher",
    TEACHER_META: "teacher",
    TEACHER_TOKENS: "teacher",
    GT_MASKS: "gt",
    EMBEDDING: "image",
}


@dataclass(frozen=True)
class ArraySpec:
    """One row array: dtype, shape of a row, rows per chunk, and its chunk byte codec."""

    name: str
    dtype: str
    row_shape: tuple[int, ...]
    chunk_rows: int
    codec: ChunkCodec

    @property
    def row_nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_rows, *self.row_shape)


@dataclass(frozen=True)
class ChunkLocation:
    """Stored bytes of one chunk: ``file`` (relative to the cache root), offset, length."""

    file: str
    offset: int
    nbytes: int


class ChunkLocator(Protocol):
    def locate(self, name: str, chunk: int) -> ChunkLocation: ...


def chunk_codec(backend: str, dtype: str, level: int) -> ChunkCodec:
    """The chunk byte pipeline a backend uses for a dtype (see codecs.py)."""
    itemsize = np.dtype(dtype).itemsize
    shuffled = np.dtype(dtype) == np.float16
    if backend == "zarr":
        return ChunkCodec("blosc-zstd-shuffle" if shuffled else "zstd", "crc32c", level, itemsize)
    return ChunkCodec("shuffle+zstd" if shuffled else "zstd", "fletcher32", level, itemsize)


def array_specs(
    header: CacheHeader, *, token_dim: int | None, embed_dim: int | None
) -> dict[str, ArraySpec]:
    """The arrays a shard written with ``header`` holds (optional ones only when stored)."""
    low = header.low_res
    rows = int(header.rows_per_chunk)
    level = int(header.codec.zstd_level)
    be = header.backend

    def spec(
        name: str, dtype: str, row_shape: tuple[int, ...], chunk_rows: int = rows
    ) -> ArraySpec:
        return ArraySpec(name, dtype, row_shape, chunk_rows, chunk_codec(be, dtype, level))

    out: dict[str, ArraySpec] = {}
    if header.store.teacher:
        out[TEACHER_LOGITS] = spec(TEACHER_LOGITS, header.codec.stored_dtype.str, (low, low))
        out[TEACHER_META] = spec(TEACHER_META, "<f4", (len(META_COLUMNS),))
        if header.store.tokens:
            if token_dim is None:
                raise CacheError("store.tokens is set but the record has no tokens")
            out[TEACHER_TOKENS] = spec(TEACHER_TOKENS, "<f2", (int(token_dim),))
    if header.store.gt:
        out[GT_MASKS] = spec(GT_MASKS, "|u1", (packed_row_bytes(low),))
    if header.store.embedding:
        if embed_dim is None:
            raise CacheError("store.embedding is set but the record has no embedding")
        e = header.embed_size
        out[EMBEDDING] = spec(EMBEDDING, "<f2", (int(embed_dim), e, e), 1)
    return out


def padded_rows(count: int, chunk_rows: int) -> int:
    """Rows an image occupies: its count rounded up to whole chunks."""
    return -(-count // chunk_rows) * chunk_rows
