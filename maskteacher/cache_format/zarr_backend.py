"""Zarr v3 shards: a group folder ``<name>.zarr`` with one sharded array per row array.

Array metadata through zarr-python (``create_array`` with ``shards=``): inner chunks are
``(chunk_rows, *row_shape)`` with codecs ``bytes -> zstd -> crc32c`` (float16:
``bytes -> blosc(zstd, shuffle) -> crc32c``); a zarr shard file holds ``chunks_per_file``
chunks. The writer encodes chunks as they come and writes each zarr shard file once
(:class:`ZarrShardWriter`; appending through zarr-python made it read and rewrite the growing
file on every image). The group attribute ``maskteacher_index`` holds the per-image table.

Read without zarr-python: a zarr shard file ends with its index (``16 * n + 4`` bytes:
little-endian uint64 (offset, nbytes) per inner chunk, then the crc32c of those bytes); the
reader checks that crc, then reads only the byte ranges of the chunks it needs. Array metadata
(``zarr.json``) is read only when the manifest does not state the layout (format 1, verify), and
then checked against the sha256 the shard's file list records. Plain ``zarr.open_array`` reads
the same data.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import google_crc32c
import numpy as np

from maskteacher.cache_format.codecs import ChunkCodec
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import parse_json
from maskteacher.cache_format.layout import ArraySpec, ChunkLocation
from maskteacher.cache_format.schema import INDEX_KEY
from maskteacher.cache_format.storage import ByteSource

_EMPTY = np.uint64(2**64 - 1)


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
    """Writes one shard folder (the caller owns the folder exclusively).

    zarr-python writes the group and array metadata (``zarr.json``). The chunks are encoded as
    they arrive, with the same byte pipeline zarr uses (:class:`ChunkCodec`: zstd frame + its
    crc32c; blosc for float16), and each zarr shard file is written once, when its
    ``chunks_per_file`` chunks are complete (the last, partial file at ``close``): the encoded
    chunks one after the other, then the shard index (uint64 offset and length per chunk,
    ``2**64 - 1`` for an absent chunk, little-endian) and the crc32c of the index. So adding an
    image costs its own encoding whatever its place in the shard; zarr-python has no way to
    append encoded chunks to a shard file without reading and rewriting it.
    """

    suffix = ".zarr"

    def __init__(self, path: str) -> None:
        import zarr

        self.path = path
        self._group = zarr.open_group(store=path, mode="w-", zarr_format=3)
        self._arrays: dict[str, Any] = {}
        self._chunks: dict[str, list[bytes]] = {}  # encoded chunks of the current file
        self._rows: dict[str, int] = {}  # rows received
        self._files: dict[str, int] = {}  # files written
        self._specs: dict[str, ArraySpec] = {}

    def create(self, spec: ArraySpec) -> None:
        if spec.name in self._arrays:
            return
        self._arrays[spec.name] = self._group.create_array(
            name=spec.name,
            shape=(0, *spec.row_shape),
            chunks=spec.chunk_shape,
            shards=(spec.chunk_rows * spec.chunks_per_file, *spec.row_shape),
            dtype=np.dtype(spec.dtype),
            compressors=_zarr_codecs(spec.codec),
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        self._chunks[spec.name], self._rows[spec.name], self._files[spec.name] = [], 0, 0
        self._specs[spec.name] = spec

    def write(self, spec: ArraySpec, start: int, rows: np.ndarray) -> None:
        """Append whole chunks of rows (``start``: the row they begin at, in order)."""
        if start != self._rows[spec.name] or rows.shape[0] % spec.chunk_rows:
            raise CacheError(f"{self.path}: rows of {spec.name} must be whole chunks, in order")
        chunks = self._chunks[spec.name]
        for k in range(0, rows.shape[0], spec.chunk_rows):
            chunks.append(spec.codec.encode(rows[k : k + spec.chunk_rows]))
            if len(chunks) == spec.chunks_per_file:
                self._write_file(spec)
        self._rows[spec.name] += rows.shape[0]

    def _write_file(self, spec: ArraySpec) -> None:
        """Write the current zarr shard file of ``spec`` (chunks, index, index crc32c)."""
        chunks = self._chunks[spec.name]
        index = np.full((spec.chunks_per_file, 2), _EMPTY, "<u8")
        offset = 0
        for j, chunk in enumerate(chunks):
            index[j] = (offset, len(chunk))
            offset += len(chunk)
        tail = index.tobytes()
        key = "/".join(["c", str(self._files[spec.name]), *["0"] * len(spec.row_shape)])
        path = os.path.join(self.path, spec.name, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.writelines(chunks)
            f.write(tail + google_crc32c.value(tail).to_bytes(4, "little"))
        self._files[spec.name] += 1
        chunks.clear()

    def close(self, index: dict[str, Any]) -> None:
        for name, arr in self._arrays.items():
            spec = self._specs[name]
            if self._chunks[name]:
                self._write_file(spec)
            arr.resize((self._rows[name], *spec.row_shape))
        self._group.attrs[INDEX_KEY] = index

    def abort(self) -> None:
        self._arrays.clear()
        self._chunks.clear()


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
    index_codecs = [c.get("name") for c in cfg.get("index_codecs", [])]
    if cfg.get("index_location", "end") != "end" or index_codecs != ["bytes", "crc32c"]:
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
    """Locates chunks of a finished zarr shard (through its shard-file indexes).

    ``specs``: the manifest's layout (format 2), or None to read each array's ``zarr.json``.
    ``digests``: sha256 of the shard's files (relative to the shard) that metadata read from the
    shard is checked against (None: not checked).
    """

    def __init__(
        self,
        source: ByteSource,
        shard_rel: str,
        specs: dict[str, ArraySpec] | None = None,
        digests: dict[str, str] | None = None,
    ) -> None:
        self.source = source
        self.shard_rel = shard_rel
        self._specs = dict(specs or {})
        self._digests = digests
        self._index_cache: dict[tuple[str, int], np.ndarray] = {}

    def _metadata(self, rel: str) -> Any:
        """A zarr.json of this shard, parsed (sha256-checked when the file list is known)."""
        raw = self.source.read_all(f"{self.shard_rel}/{rel}")
        where = self.source.describe(f"{self.shard_rel}/{rel}")
        if self._digests is not None and self._digests.get(rel) != hashlib.sha256(raw).hexdigest():
            raise CacheError(f"{where}: fails its sha256 check (contents changed)")
        return parse_json(raw, where)

    def read_index(self) -> Any:
        group = self._metadata("zarr.json")
        attrs = group.get("attributes", {}) if isinstance(group, dict) else {}
        if not isinstance(attrs, dict) or INDEX_KEY not in attrs:
            raise CacheError(
                f"{self.source.describe(self.shard_rel)}: zarr group has no {INDEX_KEY!r} attribute"
            )
        return attrs[INDEX_KEY]

    def array_spec(self, name: str, expected: ArraySpec) -> ArraySpec:
        """Read ``<name>/zarr.json``, check it against ``expected`` (dtype, row shape, codecs),
        and use it from now on; returns the spec as stored."""
        where = self.source.describe(f"{self.shard_rel}/{name}")
        meta = self._metadata(f"{name}/zarr.json")
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
            not inner
            or inner[1:] != list(expected.row_shape)
            or grid[1:] != list(expected.row_shape)
            or grid[0] % inner[0]
        ):
            raise CacheError(
                f"{where}: chunks {inner} inside shards {grid} do not fit rows of {list(expected.row_shape)}"
            )
        spec = ArraySpec(
            name, expected.dtype, expected.row_shape, int(inner[0]), codec, grid[0] // inner[0]
        )
        self._specs[name] = spec
        return spec

    def _shard_file(self, name: str, shard: int) -> str:
        tail = "/".join(["0"] * len(self._specs[name].row_shape))
        return f"{self.shard_rel}/{name}/c/{shard}/{tail}"

    def _shard_index(self, name: str, shard: int) -> tuple[str, np.ndarray]:
        file = self._shard_file(name, shard)
        key = (name, shard)
        n = self._specs[name].chunks_per_file
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
        if name not in self._specs:
            raise CacheError(
                f"{self.source.describe(self.shard_rel)}: no layout known for {name!r}"
            )
        n = self._specs[name].chunks_per_file
        file, index = self._shard_index(name, chunk // n)
        off, nbytes = index[chunk % n]
        if off == _EMPTY:
            raise CacheError(f"{self.source.describe(file)}: chunk {chunk} of {name!r} is missing")
        return ChunkLocation(file, int(off), int(nbytes))

    def close(self) -> None:
        self._index_cache.clear()
