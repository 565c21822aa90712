"""Row arrays bound to their byte codecs, and how their chunks are found, for both backends.

:mod:`.schema` states which arrays a shard holds and their dtypes and row shapes; this module
adds the chunk byte pipeline (:class:`~maskteacher.cache_format.codecs.ChunkCodec`) a backend
uses for each, as an :class:`ArraySpec`. A backend supplies, for chunk ``j`` of an array, the
file and byte range holding its stored bytes (:class:`ChunkLocation`); the reader fetches those
bytes and decodes them with the array's codec. A format-2 manifest records the specs of every
array (``layout``), so readers need no per-shard metadata to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from maskteacher.cache_format.codecs import ChunkCodec
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import as_dict, get
from maskteacher.cache_format.schema import ARRAYS, DATA_DIM_ARRAYS, CacheHeader, row_format

#: Raw bytes aimed at per zarr shard file (a zarr shard holds whole chunks, at most 1024).
TARGET_FILE_BYTES = 32 * 2**20
MAX_CHUNKS_PER_FILE = 1024


@dataclass(frozen=True)
class ArraySpec:
    """One row array: dtype, shape of a row, rows per chunk, its chunk byte codec and (zarr) how
    many chunks one storage file holds."""

    name: str
    dtype: str
    row_shape: tuple[int, ...]
    chunk_rows: int
    codec: ChunkCodec
    chunks_per_file: int = 1

    @property
    def row_nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_rows, *self.row_shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "row_shape": list(self.row_shape),
            "chunk_rows": self.chunk_rows,
            "chunks_per_file": self.chunks_per_file,
            "codec": {**self.codec.to_json(), "itemsize": self.codec.itemsize},
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> ArraySpec:
        name = where.rsplit(".", 1)[-1]
        d = as_dict(data, where)
        c = as_dict(get(d, "codec", dict, where), f"{where}: codec")
        codec = ChunkCodec(
            get(c, "compressor", str, where),
            get(c, "integrity", str, where),
            get(c, "level", int, where),
            get(c, "itemsize", int, where),
        )
        shape = tuple(get(d, "row_shape", list, where))
        rows, per_file = get(d, "chunk_rows", int, where), get(d, "chunks_per_file", int, where)
        bad = any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in shape)
        if bad or rows < 1 or per_file < 1:
            raise CacheError(f"{where}: bad row shape / chunk rows {shape} / {rows} / {per_file}")
        return cls(
            name, str(np.dtype(get(d, "dtype", str, where)).str), shape, rows, codec, per_file
        )


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
    if backend == "zarr":  # blosc's levels stop at 9
        if shuffled:
            return ChunkCodec("blosc-zstd-shuffle", "crc32c", min(level, 9), itemsize)
        return ChunkCodec("zstd", "crc32c", level, itemsize)
    return ChunkCodec("shuffle+zstd" if shuffled else "zstd", "fletcher32", level, itemsize)


def chunks_per_file(backend: str, chunk_rows: int, row_nbytes: int) -> int:
    """Chunks per zarr shard file (about :data:`TARGET_FILE_BYTES` raw); 1 for HDF5."""
    if backend != "zarr":
        return 1
    per_chunk = max(chunk_rows * row_nbytes, 1)
    return int(max(1, min(MAX_CHUNKS_PER_FILE, TARGET_FILE_BYTES // per_chunk)))


def array_specs(header: CacheHeader, dims: dict[str, int]) -> dict[str, ArraySpec]:
    """The arrays a shard written with ``header`` holds (:data:`~.schema.ARRAYS` whose store flag
    is set); ``dims`` gives the channel count C of the arrays in :data:`~.schema.DATA_DIM_ARRAYS`."""
    out: dict[str, ArraySpec] = {}
    for array in ARRAYS:
        if not getattr(header.store, array.store):
            continue
        dim = dims.get(array.name) if array.name in DATA_DIM_ARRAYS else None
        dtype, row_shape, rows = row_format(header, array.name, dim)
        codec = chunk_codec(header.backend, dtype, int(header.codec.zstd_level))
        row_nbytes = np.dtype(dtype).itemsize * int(np.prod(row_shape))
        per_file = chunks_per_file(header.backend, rows, row_nbytes)
        out[array.name] = ArraySpec(array.name, dtype, row_shape, rows, codec, per_file)
    return out


def padded_rows(count: int, chunk_rows: int) -> int:
    """Rows an image occupies: its count rounded up to whole chunks."""
    return -(-count // chunk_rows) * chunk_rows
