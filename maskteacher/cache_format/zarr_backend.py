"""Zarr v3 shards: a group folder ``<name>.zarr`` with one sharded array per row array.

Written through zarr-python (``create_array`` with ``shards=``): inner chunks are
``(chunk_rows, *row_shape)`` with codecs ``bytes -> zstd -> crc32c`` (float16:
``bytes -> blosc(zstd, shuffle) -> crc32c``); zarr shards hold several chunks so a cache has few
files. The group attribute ``maskteacher_index`` holds the per-image table.

Read without zarr-python: the reader parses the arrays' ``zarr.json``, checks they use exactly
the codecs above, reads a zarr shard's index (``16 * n + 4`` bytes at the end of the shard file:
little-endian uint64 (offset, nbytes) per inner chunk, then the crc32c of those bytes) and then
only the byte ranges of the chunks it needs. Plain ``zarr.open_array`` reads the same data.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np

from maskteacher.cache_format.codecs import ChunkCodec
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.layout import ArraySpec, ChunkLocation
from maskteacher.cache_format.manifest import parse_json
from maskteacher.cache_format.schema import INDEX_KEY
from maskteacher.cache_format.storage import ByteSource

#: Raw bytes aimed at per zarr shard file (a zarr shard holds whole chunks, at most 1024).
TARGET_SHARD_BYTES = 32 * 2**20
MAX_CHUNKS_PER_SHARD = 1024
_EMPTY = np.uint64(2**64 - 1)


def chunks_per_shard(spec: ArraySpec) -> int:
    per_chunk = spec.chunk_rows * spec.row_nbytes
    return int(max(1, min(MAX_CHUNKS_PER_SHARD, TARGET_SHARD_BYTES // max(per_chunk, 1))))


def _zarr_codecs(codec: ChunkCodec) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec.compressor == "zstd":
        main = ZstdCodec(level=codec.level, checksum=False)
    elif codec.compressor == "blosc-zstd-shuffle":
        main = BloscCodec(
            cname="zstd",
            clevel=min(codec.level, 9),
            shuffle="shuffle",
            typesize=codec.itemsize,
            blocksize=0,
        )
    else:  # pragma: no cover - chunk_codec() never gives zarr another compressor
        raise CacheError(f"zarr backend cannot store compressor {codec.compressor!r}")
    return [main, Crc32cCodec()]


class ZarrShardWriter:
    """Writes one shard folder through zarr-python (the caller owns the folder exclusively)."""

    suffix = ".zarr"

    def __init__(self, path: str) -> None:
        import zarr

        self.path = path
        self._group = zarr.open_group(store=path, mode="w-", zarr_format=3)
        self._arrays: dict[str, Any] = {}

    def create(self, spec: ArraySpec) -> None:
        if spec.name in self._arrays:
            return
        shard_rows = spec.chunk_rows * chunks_per_shard(spec)
        self._arrays[spec.name] = self._group.create_array(
            name=spec.name,
            shape=(0, *spec.row_shape),
            chunks=spec.chunk_shape,
            shards=(shard_rows, *spec.row_shape),
            dtype=np.dtype(spec.dtype),
            compressors=_zarr_codecs(spec.codec),
            fill_value=0,
            config={"write_empty_chunks": True},
        )

    def write(self, spec: ArraySpec, start: int, rows: np.ndarray) -> None:
        arr = self._arrays[spec.name]
        end = start + rows.shape[0]
        arr.resize((end, *spec.row_shape))
        arr[start:end] = rows

    def close(self, index: dict[str, Any]) -> None:
        self._group.attrs[INDEX_KEY] = index

    def abort(self) -> None:
        self._arrays.clear()


# --------------------------------------------------------------------------------------------
# Reading


def _parse_codecs(
    meta: dict[str, Any], name: str, dtype: np.dtype, where: str
) -> tuple[list[int], ChunkCodec]:
    """Check an array's codecs are the ones we write; return (inner chunk shape, ChunkCodec)."""
    codecs = meta.get("codecs")
    if not (
        isinstance(codecs, list)
        and len(codecs) == 1
        and codecs[0].get("name") == "sharding_indexed"
    ):
        raise CacheError(
            f"{where}: array {name!r} is not stored with the sharding codec this reader expects"
        )
    cfg = codecs[0].get("configuration", {})
    inner = cfg.get("codecs", [])
    index_codecs = cfg.get("index_codecs", [])
    if cfg.get("index_location", "end") != "end" or [c.get("name") for c in index_codecs] != [
        "bytes",
        "crc32c",
    ]:
        raise CacheError(f"{where}: array {name!r} has an unsupported zarr shard index layout")
    names = [c.get("name") for c in inner]
    if len(names) != 3 or names[0] != "bytes" or names[2] != "crc32c":
        raise CacheError(f"{where}: array {name!r} has unsupported codecs {names}")
    endian = inner[0].get("configuration", {}).get("endian", "little")
    if dtype.itemsize > 1 and endian != "little":
        raise CacheError(
            f"{where}: array {name!r} is big-endian; the cache format is little-endian"
        )
    main = inner[1]
    conf = main.get("configuration", {})
    if main.get("name") == "zstd" and not conf.get("checksum", False):
        codec = ChunkCodec("zstd", "crc32c", int(conf.get("level", 0)), dtype.itemsize)
    elif (
        main.get("name") == "blosc"
        and conf.get("cname") == "zstd"
        and conf.get("shuffle") == "shuffle"
    ):
        codec = ChunkCodec(
            "blosc-zstd-shuffle", "crc32c", int(conf.get("clevel", 0)), dtype.itemsize
        )
    else:
        raise CacheError(f"{where}: array {name!r} uses an unsupported compressor {main!r}")
    return list(cfg.get("chunk_shape", [])), codec


class ZarrShardReader:
    """Locates chunks of a finished zarr shard through its ``zarr.json`` files and shard indexes."""

    def __init__(self, source: ByteSource, shard_rel: str) -> None:
        self.source = source
        self.shard_rel = shard_rel
        self._shards_per: dict[str, int] = {}
        self._index_cache: dict[tuple[str, int], np.ndarray] = {}
        self._ndim: dict[str, int] = {}

    def read_index(self) -> Any:
        group = parse_json(
            self.source.read_all(f"{self.shard_rel}/zarr.json"),
            self.source.describe(self.shard_rel),
        )
        attrs = group.get("attributes", {}) if isinstance(group, dict) else {}
        if INDEX_KEY not in attrs:
            raise CacheError(
                f"{self.source.describe(self.shard_rel)}: zarr group has no {INDEX_KEY!r} attribute"
            )
        return attrs[INDEX_KEY]

    def array_spec(self, name: str, expected: ArraySpec) -> ArraySpec:
        """Read ``<name>/zarr.json``, check it against what the header implies, return the spec."""
        where = self.source.describe(f"{self.shard_rel}/{name}")
        meta = parse_json(self.source.read_all(f"{self.shard_rel}/{name}/zarr.json"), where)
        if (
            not isinstance(meta, dict)
            or meta.get("zarr_format") != 3
            or meta.get("node_type") != "array"
        ):
            raise CacheError(f"{where}: not a zarr v3 array")
        dtype = np.dtype(expected.dtype)
        if np.dtype(str(meta.get("data_type"))) != dtype:
            raise CacheError(f"{where}: data_type {meta.get('data_type')!r}, expected {dtype}")
        shape = meta.get("shape", [])
        if list(shape[1:]) != list(expected.row_shape):
            raise CacheError(f"{where}: row shape {shape[1:]}, expected {list(expected.row_shape)}")
        key_enc = meta.get("chunk_key_encoding", {})
        if (
            key_enc.get("name") != "default"
            or key_enc.get("configuration", {}).get("separator", "/") != "/"
        ):
            raise CacheError(f"{where}: unsupported chunk_key_encoding {key_enc!r}")
        grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
        inner, codec = _parse_codecs(meta, name, dtype, where)
        if (
            inner[1:] != list(expected.row_shape)
            or grid[1:] != list(expected.row_shape)
            or grid[0] % inner[0]
        ):
            raise CacheError(
                f"{where}: chunks {inner} inside shards {grid} do not fit rows of {list(expected.row_shape)}"
            )
        self._shards_per[name] = grid[0] // inner[0]
        self._ndim[name] = len(shape)
        return ArraySpec(name, expected.dtype, expected.row_shape, int(inner[0]), codec)

    def _shard_file(self, name: str, shard: int) -> str:
        tail = "/".join(["0"] * (self._ndim[name] - 1))
        return (
            f"{self.shard_rel}/{name}/c/{shard}/{tail}"
            if tail
            else f"{self.shard_rel}/{name}/c/{shard}"
        )

    def _shard_index(self, name: str, shard: int) -> tuple[str, np.ndarray]:
        file = self._shard_file(name, shard)
        key = (name, shard)
        n = self._shards_per[name]
        if key not in self._index_cache:
            size = self.source.size(file)
            nbytes = 16 * n + 4
            if size < nbytes:
                raise CacheError(f"{self.source.describe(file)} is truncated ({size} bytes)")
            tail = self.source.read(file, size - nbytes, size)
            body = tail[:-4]
            if google_crc32c.value(body) != int.from_bytes(tail[-4:], "little"):
                raise CacheError(
                    f"{self.source.describe(file)}: zarr shard index fails its crc32c check"
                )
            index = np.frombuffer(body, "<u8").reshape(n, 2)
            ok = index[:, 0] != _EMPTY
            if ok.any() and int((index[ok, 0] + index[ok, 1]).max()) > size - nbytes:
                raise CacheError(
                    f"{self.source.describe(file)}: zarr shard index points past the data"
                )
            self._index_cache[key] = index
        return file, self._index_cache[key]

    def locate(self, name: str, chunk: int) -> ChunkLocation:
        n = self._shards_per[name]
        file, index = self._shard_index(name, chunk // n)
        off, nbytes = index[chunk % n]
        if off == _EMPTY:
            raise CacheError(f"{self.source.describe(file)}: chunk {chunk} of {name!r} is missing")
        return ChunkLocation(file, int(off), int(nbytes))

    def close(self) -> None:
        pass
