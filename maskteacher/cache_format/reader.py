"""Reading a cache: ``open_cache(path_or_url) -> CacheReader``; numpy out, numpy + json + zarr's
codec libraries in (never torch, never zarr/h5py array machinery on the hot path).

``reader[i]`` / ``reader[image_id]`` -> :class:`CacheRecord` (decoded, stored logit dtype).
For DataLoader workers there is a cheaper split: ``reader.read_raw(i)`` returns a
:class:`RawRecord` (the compressed chunk bytes, ~0.2 MB per image, cheap to pass between
processes) and :func:`decode_raw` turns it into the record wherever that is wanted
(docs/cache_format.md, "Reading in a DataLoader").

Handles are per process: a reader opened before a fork reopens its files in the child.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskteacher.cache_format.codecs import ChunkError, unpack_masks
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.hdf5_backend import Hdf5ShardReader
from maskteacher.cache_format.layout import ROW_SPACE, ArraySpec, ChunkLocation, array_specs
from maskteacher.cache_format.manifest import (
    HEADER_NAME,
    MANIFEST_NAME,
    check_expect,
    check_relative_path,
    parse_json,
)
from maskteacher.cache_format.schema import (
    EMBEDDING,
    GT_MASKS,
    TEACHER_LOGITS,
    TEACHER_META,
    TEACHER_TOKENS,
    CacheHeader,
    CacheRecord,
    Manifest,
    ShardEntry,
    ShardIndex,
    empty_teacher,
)
from maskteacher.cache_format.storage import ByteSource, make_source
from maskteacher.cache_format.zarr_backend import ZarrShardReader

BACKEND_READERS = {"zarr": ZarrShardReader, "hdf5": Hdf5ShardReader}


@dataclass
class RawField:
    """The stored chunks of one array for one image: ``blob[a:b]`` for each chunk's span."""

    spec: ArraySpec
    count: int
    blob: bytes
    spans: list[tuple[int, int]]


@dataclass
class RawRecord:
    """Compressed form of one :class:`CacheRecord` (picklable; decode with :func:`decode_raw`)."""

    image_id: str
    split: str
    shard: str
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]
    source: str | None
    low_res: int
    logit_dtype: str
    fields: dict[str, RawField]

    @property
    def nbytes(self) -> int:
        return sum(len(f.blob) for f in self.fields.values())


def decode_raw(raw: RawRecord) -> CacheRecord:
    """Check and decompress a :class:`RawRecord`; CacheError naming shard and image on failure."""
    arrays = {name: _decode_field(raw, name, f) for name, f in raw.fields.items()}
    low = raw.low_res
    if TEACHER_LOGITS in arrays:
        meta = arrays[TEACHER_META]
        teacher = {
            "teacher_logits": arrays[TEACHER_LOGITS],
            "teacher_points": np.ascontiguousarray(meta[:, 0:2]),
            "teacher_iou": np.ascontiguousarray(meta[:, 2]),
            "teacher_stability": np.ascontiguousarray(meta[:, 3]),
            "teacher_boxes": np.ascontiguousarray(meta[:, 4:8]),
        }
    else:
        teacher = empty_teacher(low, np.dtype(raw.logit_dtype))
    if GT_MASKS in arrays:
        gt = unpack_masks(arrays[GT_MASKS], low)
    else:
        gt = np.zeros((0, low, low), np.bool_)
    emb = arrays.get(EMBEDDING)
    return CacheRecord(
        image_id=raw.image_id,
        split=raw.split,
        orig_hw=np.asarray(raw.orig_hw, np.int64),
        input_hw=np.asarray(raw.input_hw, np.int64),
        gt_masks=gt,
        embedding=None if emb is None else emb[0],
        tokens=arrays.get(TEACHER_TOKENS),
        source=raw.source,
        **teacher,
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
    dtype = np.dtype(spec.dtype)
    k = spec.chunk_rows
    out = np.empty((f.count, *spec.row_shape), dtype)
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
    shape = spec.chunk_shape
    key = (shape, spec.dtype)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = np.empty(shape, np.dtype(spec.dtype))
    return buf


class ShardReader:
    """One finished shard: its per-image index, array layout and chunk bytes."""

    def __init__(self, source: ByteSource, entry: ShardEntry, header: CacheHeader) -> None:
        self.source = source
        self.entry = entry
        self.header = header
        self.backend = BACKEND_READERS[entry.backend](source, entry.path)
        self._index: ShardIndex | None = None
        self._specs: dict[str, ArraySpec] | None = None

    @property
    def where(self) -> str:
        return self.entry.path

    def index(self) -> ShardIndex:
        if self._index is None:
            idx = ShardIndex.from_json(
                self.backend.read_index(), self.source.describe(self.entry.path)
            )
            if idx.split != self.entry.split:
                raise CacheError(
                    f"shard {self.where}: index says split {idx.split!r}, manifest says {self.entry.split!r}"
                )
            if idx.image_id != self.entry.image_ids:
                raise CacheError(
                    f"shard {self.where}: its image ids differ from the manifest's list"
                )
            self._index = idx
        return self._index

    def specs(self) -> dict[str, ArraySpec]:
        if self._specs is None:
            idx = self.index()
            expected = array_specs(self.header, token_dim=1, embed_dim=1)
            specs = {}
            for name, exp in expected.items():
                if name in (TEACHER_TOKENS, EMBEDDING):
                    if not len(idx):
                        continue
                    exp = self._with_data_dim(name, exp)
                specs[name] = self.backend.array_spec(name, exp)
            self._specs = specs
        return self._specs

    def _with_data_dim(self, name: str, exp: ArraySpec) -> ArraySpec:
        """Tokens and embeddings take their channel count C from the data: read it from the shard."""
        dim = self.index().dims.get(name)
        if dim is None:
            raise CacheError(
                f"shard {self.where}: index does not record the channel count of {name!r}"
            )
        shape = (dim,) if name == TEACHER_TOKENS else (dim, *exp.row_shape[1:])
        return ArraySpec(name, exp.dtype, shape, exp.chunk_rows, exp.codec)

    def plan(self, local: int) -> list[tuple[ArraySpec, int, list[ChunkLocation]]]:
        """For image ``local`` of this shard: each stored array's spec, row count and the chunk
        locations to read (whole chunks; rows past the count are padding)."""
        idx = self.index()
        out = []
        for name, spec in self.specs().items():
            space = ROW_SPACE[name]
            if space == "image":
                start, count = local, 1
            elif space == "teacher":
                start, count = idx.teacher_start[local], idx.teacher_count[local]
            else:
                start, count = idx.gt_start[local], idx.gt_count[local]
            if start % spec.chunk_rows:
                raise CacheError(f"{name} rows start at {start}, not on a chunk boundary")
            first = start // spec.chunk_rows
            chunks = range(first, first + -(-count // spec.chunk_rows))
            out.append((spec, count, [self.backend.locate(name, j) for j in chunks]))
        return out

    def read_raw(self, local: int) -> RawRecord:
        """The stored bytes of image ``local``; CacheError names the shard and the image."""
        image_id = self.entry.image_ids[local]
        try:
            idx = self.index()
            fields = {
                spec.name: self._fetch(spec, count, locs) for spec, count, locs in self.plan(local)
            }
        except CacheError as exc:
            raise CacheError(f"shard {self.where}: image {image_id!r}: {exc}") from None
        return RawRecord(
            image_id=image_id,
            split=idx.split,
            shard=self.where,
            orig_hw=(int(idx.orig_hw[local][0]), int(idx.orig_hw[local][1])),
            input_hw=(int(idx.input_hw[local][0]), int(idx.input_hw[local][1])),
            source=idx.source[local],
            low_res=self.header.low_res,
            logit_dtype=self.header.codec.stored_dtype.str,
            fields=fields,
        )

    def _fetch(self, spec: ArraySpec, count: int, locs: list[ChunkLocation]) -> RawField:
        if not locs:
            return RawField(spec, count, b"", [])
        lo = min(loc.offset for loc in locs)
        hi = max(loc.offset + loc.nbytes for loc in locs)
        if len({loc.file for loc in locs}) == 1 and hi - lo <= 2 * sum(loc.nbytes for loc in locs):
            blob = self.source.read(locs[0].file, lo, hi)
            spans = [(loc.offset - lo, loc.offset - lo + loc.nbytes) for loc in locs]
        else:  # chunks far apart or in several zarr shard files: one read each
            parts, spans, pos = [], [], 0
            for loc in locs:
                parts.append(self.source.read(loc.file, loc.offset, loc.offset + loc.nbytes))
                spans.append((pos, pos + loc.nbytes))
                pos += loc.nbytes
            blob = b"".join(parts)
        return RawField(spec, count, blob, spans)

    def close(self) -> None:
        self.backend.close()


class CacheReader:
    """Random access to the images of a cache (one split, or all splits).

    ``len(reader)``, ``reader.image_ids``, ``reader.splits`` (per item), ``reader[i]``,
    ``reader[image_id]`` (when the id is unique across the opened splits), ``reader.read_raw(i)``.
    Safe to pass to DataLoader workers (fork or spawn): handles are reopened per process.
    """

    def __init__(self, source: ByteSource, manifest: Manifest, split: str | None = None) -> None:
        self.source = source
        self.manifest = manifest
        self.header = manifest.header
        self.split = split
        self._items: list[tuple[int, int]] = []
        self.image_ids: list[str] = []
        self.splits: list[str] = []
        self._by_id: dict[str, list[int]] = {}
        seen: dict[tuple[str, str], str] = {}
        for k, entry in enumerate(manifest.shards):
            check_relative_path(entry.path, f"{MANIFEST_NAME}: shards[{k}].path")
            if entry.backend != self.header.backend:
                raise CacheError(
                    f"{MANIFEST_NAME}: shard {entry.path} has backend {entry.backend!r}, the cache {self.header.backend!r}"
                )
            if split is not None and entry.split != split:
                continue
            for local, image_id in enumerate(entry.image_ids):
                key = (entry.split, image_id)
                if key in seen:
                    raise CacheError(
                        f"{MANIFEST_NAME}: image {image_id!r} ({entry.split}) is in shards {seen[key]} and {entry.path}"
                    )
                seen[key] = entry.path
                self._by_id.setdefault(image_id, []).append(len(self._items))
                self._items.append((k, local))
                self.image_ids.append(image_id)
                self.splits.append(entry.split)
        self._shards: dict[int, ShardReader] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def __len__(self) -> int:
        return len(self._items)

    def index_of(self, image_id: str, split: str | None = None) -> int:
        hits = [
            i for i in self._by_id.get(image_id, []) if split is None or self.splits[i] == split
        ]
        if not hits:
            raise CacheError(f"image {image_id!r} is not in the cache {self.source.describe()}")
        if len(hits) > 1:
            raise CacheError(
                f"image {image_id!r} is in several splits of the cache: open it with split=..."
            )
        return hits[0]

    def _position(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        i = int(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} images")
        return i % len(self)

    def shard_reader(self, k: int) -> ShardReader:
        reader = self._shards.get(k)
        if reader is None:
            reader = ShardReader(self.source, self.manifest.shards[k], self.header)
            self._shards[k] = reader
        return reader

    def locate(self, key: int | str) -> tuple[ShardReader, int]:
        """The shard reader holding an image and the image's position in that shard."""
        k, local = self._items[self._position(key)]
        return self.shard_reader(k), local

    def read_raw(self, key: int | str) -> RawRecord:
        shard, local = self.locate(key)
        return shard.read_raw(local)

    def __getitem__(self, key: int | str) -> CacheRecord:
        return decode_raw(self.read_raw(key))

    @staticmethod
    def decode(raw: RawRecord) -> CacheRecord:
        return decode_raw(raw)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
        self._shards = {}


def load_manifest(source: ByteSource) -> Manifest:
    where = source.describe(MANIFEST_NAME)
    if not source.exists(MANIFEST_NAME):
        if source.exists(HEADER_NAME):
            raise CacheError(
                f"{source.describe()} has no {MANIFEST_NAME}: the cache is unfinished (finalize did "
                f"not run); finish it with 'maskteacher cache merge {source.describe()} {source.describe()}'"
            )
        raise CacheError(f"{source.describe()} is not a cache: no {MANIFEST_NAME}")
    return Manifest.from_json(parse_json(source.read_all(MANIFEST_NAME), where), where)


def open_cache(
    path_or_url: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    split: str | None = None,
) -> CacheReader:
    """Open a finished cache (folder path, ``file://`` or any fsspec URL) for reading.

    ``expect`` names fields the caller relies on (see :func:`check_expect`): a mismatch raises
    CacheError naming the field and both values. ``split`` restricts the reader to one split.
    """
    source = make_source(path_or_url)
    manifest = load_manifest(source)
    if expect:
        check_expect(manifest, expect, source.describe())
    if (
        split is not None
        and split not in {s.split for s in manifest.shards}
        and split not in manifest.header.fingerprints
    ):
        raise CacheError(f"cache {source.describe()} holds no split {split!r}")
    return CacheReader(source, manifest, split)
