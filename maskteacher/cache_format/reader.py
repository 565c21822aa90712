"""Reading a cache: ``open_cache(path_or_url) -> CacheReader``; numpy out, numpy + json + zarr's
codec libraries in (never torch, never zarr/h5py array machinery on the hot path).

``reader[i]`` / ``reader[image_id]`` -> :class:`CacheRecord` (decoded, stored logit dtype).
In a DataLoader, workers call ``reader.read_raw(i, fields=...)`` (compressed bytes of only the
arrays those fields live in) and the main process decodes the batch with
:func:`~maskteacher.cache_format.raw.decode_many` (docs/cache_format.md, "Reading in a
DataLoader"). Memory stays flat however large the cache: the index is memory-mapped numpy
columns (shared between worker processes, never copied), at most ``max_open_shards`` shard
readers are kept (least recently used are closed) and file descriptors are bounded too.

``verify_shards=True`` checks the sha256 of every file of a shard the first time this process
reads from it (and refuses the shard from then on if one fails): ``cache.verify_on_open`` for a
run, paid for the shards the run actually reads, as it reads them.

Handles are per process: a reader opened before a fork reopens its files in the child.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from maskteacher.cache_format.checks import shard_file_problems
from maskteacher.cache_format.decoder_file import read_decoder_weights
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.identity import check_expect
from maskteacher.cache_format.index import CacheIndex, IdView, build_columns, id_hash
from maskteacher.cache_format.manifest import Manifest, ShardEntry, load_manifest, load_sidecar
from maskteacher.cache_format.paths import MANIFEST_NAME, sidecar_rel_path
from maskteacher.cache_format.raw import ARRAY_FIELDS, RawRecord, arrays_for, decode_raw
from maskteacher.cache_format.schema import SHARD_SUFFIX, SPLITS, CacheRecord
from maskteacher.cache_format.shard_reader import ImageRows, ShardReader
from maskteacher.cache_format.storage import ByteSource, make_source

#: Shard readers a cache reader keeps open (least recently used beyond this are closed).
MAX_OPEN_SHARDS = 32


class SplitView(Sequence):
    """The split of every image of a reader, as a read-only sequence of str."""

    def __init__(self, codes: np.ndarray) -> None:
        self._codes = codes

    def __len__(self) -> int:
        return int(self._codes.size)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [SPLITS[int(c)] for c in self._codes[i]]
        return SPLITS[int(self._codes[i])]

    def __iter__(self) -> Iterator[str]:
        return (SPLITS[int(c)] for c in self._codes)


class CacheReader:
    """Random access to the images of a cache (one split, or all splits).

    ``len(reader)``, ``reader.image_ids`` / ``reader.splits`` (sequences, decoded on access),
    ``reader[i]``, ``reader[image_id]`` (when the id is unique across the opened splits),
    ``reader.index_of(id, split)``, ``reader.positions_of(ids, split)``,
    ``reader.read_raw(i, fields=...)``, ``reader.cache_id``. Safe to pass to DataLoader workers
    (fork or spawn): handles are reopened per process.
    """

    def __init__(
        self,
        source: ByteSource,
        manifest: Manifest,
        index: CacheIndex,
        split: str | None = None,
        *,
        verify_shards: bool = False,
        max_open_shards: int = MAX_OPEN_SHARDS,
    ) -> None:
        self.source = source
        self.manifest = manifest
        self.header = manifest.header
        self.index = index
        self.split = split
        codes = index.col("split")
        self.positions = None if split is None else np.flatnonzero(codes == SPLITS.index(split))
        self.verify_shards = verify_shards
        self.max_open_shards = max_open_shards
        self._state = np.zeros(len(manifest.shards), np.int8)  # shard checks: 0 todo, 1 ok, 2 bad
        self._problems: dict[int, str] = {}
        self._shards: OrderedDict[int, ShardReader] = OrderedDict()
        self._cache_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.index) if self.positions is None else int(self.positions.size)

    @property
    def image_ids(self) -> IdView:
        return IdView(self.index, self.positions)

    @property
    def splits(self) -> SplitView:
        codes = self.index.col("split")
        return SplitView(codes if self.positions is None else codes[self.positions])

    @property
    def cache_id(self) -> str:
        """Stable id of the cache's content (see :meth:`Manifest.cache_id`)."""
        if self._cache_id is None:
            self._cache_id = self.manifest.cache_id()
        return self._cache_id

    def decoder_weights(self) -> dict[str, np.ndarray] | None:
        """The teacher's prompt encoder + mask decoder arrays (``teacher_decoder.npz``, checked
        against the manifest's sha256), or None when the cache holds none."""
        if self.manifest.decoder is None:
            return None
        return read_decoder_weights(self.source, self.manifest.decoder)

    # -- positions -----------------------------------------------------------------------------

    def _global(self, i: int) -> int:
        return i if self.positions is None else int(self.positions[i])

    def _local_positions(self, globals_: list[int], split: str | None) -> list[int]:
        codes = self.index.col("split")
        hits = [p for p in globals_ if split is None or SPLITS[int(codes[p])] == split]
        if self.positions is None:
            return hits
        where = np.searchsorted(self.positions, hits)
        return [
            int(w)
            for w, p in zip(where, hits)
            if w < self.positions.size and self.positions[w] == p
        ]

    def index_of(self, image_id: str, split: str | None = None) -> int:
        """The position of ``image_id`` (in ``split``); CacheError when absent or ambiguous."""
        hits = self._local_positions(self.index.find(image_id), split)
        if not hits:
            raise CacheError(f"image {image_id!r} is not in the cache {self.source.describe()}")
        if len(hits) > 1:
            raise CacheError(
                f"image {image_id!r} is in several splits of the cache: open it with split=..."
            )
        return hits[0]

    def positions_of(self, image_ids: Iterable[str], split: str | None = None) -> np.ndarray:
        """(len(ids),) int64 positions of many ids (-1 where absent; ``split`` picks one split)."""
        ids = list(image_ids)
        hashes = self.index.col("lookup.hash")
        order = self.index.col("lookup.order")
        want = np.array([id_hash(i) for i in ids], np.uint64)
        lo, hi = np.searchsorted(hashes, want, "left"), np.searchsorted(hashes, want, "right")
        out = np.full(len(ids), -1, np.int64)
        for k, image_id in enumerate(ids):
            cands = [
                int(p) for p in order[lo[k] : hi[k]] if self.index.image_id(int(p)) == image_id
            ]
            hits = self._local_positions(sorted(cands), split)
            if len(hits) > 1:
                raise CacheError(
                    f"image {image_id!r} is in several splits of the cache: pass split=..."
                )
            if hits:
                out[k] = hits[0]
        return out

    def teacher_counts(self, positions: np.ndarray) -> np.ndarray:
        """(n,) int64 number of teacher masks of the images at (this reader's) ``positions``."""
        local = np.asarray(positions, np.int64)
        rows = local if self.positions is None else self.positions[local]
        return np.asarray(self.index.col("teacher_count"))[rows].astype(np.int64)

    def _position(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        i = int(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} images")
        return i % len(self)

    # -- shards --------------------------------------------------------------------------------

    def shard_reader(self, k: int) -> ShardReader:
        """Reader of shard ``k`` (kept in a small LRU)."""
        reader = self._shards.get(k)
        if reader is not None:
            self._shards.move_to_end(k)
            return reader
        reader = self._shards[k] = ShardReader(
            self.source, self.manifest.shards[k], self.header, self.manifest.layout
        )
        while len(self._shards) > self.max_open_shards:
            self._shards.popitem(last=False)[1].close()
        return reader

    def shard_entry(self, k: int) -> ShardEntry:
        """Shard ``k``'s full entry (file list, image ids): its sidecar (format 2, sha256-checked)."""
        entry = self.manifest.shards[k]
        if entry.files is not None:
            return entry
        return load_sidecar(
            self.source, entry, sidecar_rel_path(entry.path, SHARD_SUFFIX[entry.backend])
        )

    def check_shard(self, k: int) -> None:
        """Check the sha256 of every file of shard ``k`` once per process; CacheError if bad."""
        if self._state[k] == 1:
            return
        entry = self.manifest.shards[k]
        if self._state[k] == 0:
            try:
                problems = shard_file_problems(self.source, self.shard_entry(k), unlisted=False)
            except CacheError as exc:
                problems = [str(exc)]
            self._state[k] = 2 if problems else 1
            if problems:
                self._problems[k] = problems[0]
        if self._state[k] == 2:
            raise CacheError(f"shard {entry.path} failed verification: {self._problems[k]}")

    def rows(self, p: int) -> ImageRows:
        col = self.index.col
        return ImageRows(
            int(col("local")[p]),
            int(col("teacher_start")[p]),
            int(col("teacher_count")[p]),
            int(col("gt_start")[p]),
            int(col("gt_count")[p]),
        )

    def locate(self, key: int | str) -> tuple[ShardReader, ImageRows]:
        """The shard reader holding an image and the image's rows in that shard."""
        p = self._global(self._position(key))
        return self.shard_reader(int(self.index.col("shard")[p])), self.rows(p)

    # -- records -------------------------------------------------------------------------------

    def read_raw(self, key: int | str, fields: Iterable[str] | None = None) -> RawRecord:
        """The compressed bytes of one image (``fields``: record fields to fetch, default all);
        CacheError names the shard and the image."""
        wanted = frozenset(ARRAY_FIELDS if fields is None else fields)
        arrays = arrays_for(wanted)
        p = self._global(self._position(key))
        index = self.index
        k = int(index.col("shard")[p])
        entry = self.manifest.shards[k]
        image_id = index.image_id(p)
        try:
            if self.verify_shards:
                self.check_shard(k)
            fetched = self.shard_reader(k).fetch(self.rows(p), arrays)
        except CacheError as exc:
            text = str(exc).removeprefix(f"shard {entry.path}: ")
            raise CacheError(f"shard {entry.path}: image {image_id!r}: {text}") from None
        orig, inp = index.col("orig_hw")[p], index.col("input_hw")[p]
        return RawRecord(
            image_id=image_id,
            split=SPLITS[int(index.col("split")[p])],
            shard=entry.path,
            orig_hw=(int(orig[0]), int(orig[1])),
            input_hw=(int(inp[0]), int(inp[1])),
            source=index.source_of(p),
            low_res=self.header.low_res,
            logit_dtype=self.header.codec.stored_dtype.str,
            fields=fetched,
            wanted=wanted,
        )

    def __getitem__(self, key: int | str) -> CacheRecord:
        return decode_raw(self.read_raw(key))

    @staticmethod
    def decode(raw: RawRecord) -> CacheRecord:
        return decode_raw(raw)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
        self._shards = OrderedDict()


def load_index(
    source: ByteSource, manifest: Manifest, *, refuse_duplicates: bool = True
) -> CacheIndex:
    """The cache's index: mapped from its files (format 2), or built in memory from the shards'
    own tables (format 1: one read per shard; ``cache upgrade`` writes the files). An image
    listed twice in one split is a CacheError (``cache verify`` reports it instead)."""
    if manifest.index is not None:
        if manifest.index.images != manifest.images:
            raise CacheError(
                f"{source.describe(MANIFEST_NAME)}: the index holds {manifest.index.images} images, "
                f"the shards {manifest.images}"
            )
        index = CacheIndex(source, manifest.index)
    else:
        index = CacheIndex(None, None, build_columns(_shard_tables(source, manifest)))
    hashes = index.col("lookup.hash") if refuse_duplicates and len(index) else None
    if hashes is not None and bool(np.any(hashes[1:] == hashes[:-1])):
        for split, image_id, positions in index.duplicates():
            shards = [manifest.shards[int(index.col("shard")[p])].path for p in positions]
            raise CacheError(
                f"{MANIFEST_NAME}: image {image_id!r} ({split}) is in shards {' and '.join(shards)}"
            )
    return index


def _shard_tables(source: ByteSource, manifest: Manifest) -> list:
    """Format 1: every shard's own table (its metadata sha256-checked against the manifest)."""
    tables = []
    for entry in manifest.shards:
        reader = ShardReader(source, entry, manifest.header, None)
        try:
            tables.append(reader.table())
        except CacheError as exc:
            raise CacheError(f"shard {entry.path}: {exc}") from None
        finally:
            reader.close()
    return tables


def open_cache(
    path_or_url: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    split: str | None = None,
    verify_shards: bool = False,
    max_open_shards: int = MAX_OPEN_SHARDS,
) -> CacheReader:
    """Open a finished cache (folder path, ``file://`` or any fsspec URL) for reading.

    ``expect`` names fields the caller relies on (see :func:`~.identity.check_expect`): a
    mismatch raises CacheError naming the field and both values. ``split`` restricts the reader
    to one split. ``verify_shards``: check each shard's file sha256 on its first read (lazy
    verify-on-open). Format-1 caches are read too (their index is built at open).
    """
    source = make_source(path_or_url)
    manifest = load_manifest(source)
    if expect:
        check_expect(manifest.header, expect, source.describe())
    if (
        split is not None
        and split not in {s.split for s in manifest.shards}
        and split not in manifest.header.fingerprints
    ):
        raise CacheError(f"cache {source.describe()} holds no split {split!r}")
    index = load_index(source, manifest)
    return CacheReader(
        source, manifest, index, split, verify_shards=verify_shards, max_open_shards=max_open_shards
    )
