"""Writing one shard: ``with ShardWriter(root, name, split=...) as w: w.add(record)``.

The shard is built under ``shards/.tmp-<name>.zarr|.h5``; leaving the ``with`` block stores the
per-image table, computes the sha256 of every file (fsyncing it), renames the shard to its final
name, writes the sidecar ``shards/<name>.json`` atomically and removes ``shards/<name>.lock``
(held with flock while writing: a second writer for the name is refused). An exception inside
the block, a failed write (disk full, read-only folder: a CacheError naming the shard and the
system's reason) or leaving without any image discards the shard and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Any

import numpy as np

from maskteacher.cache_format.codecs import merge_quant_stats
from maskteacher.cache_format.errors import CacheError, os_errors
from maskteacher.cache_format.hdf5_backend import Hdf5ShardWriter
from maskteacher.cache_format.jsonio import write_json_atomic
from maskteacher.cache_format.layout import ArraySpec, array_specs, padded_rows
from maskteacher.cache_format.locks import ExclusiveLock
from maskteacher.cache_format.manifest import ShardEntry, ShardFile, load_header
from maskteacher.cache_format.paths import SHARDS_DIR, TMP_PREFIX, shard_rel_path
from maskteacher.cache_format.records import check_record, encode_record
from maskteacher.cache_format.schema import (
    ARRAY_BY_NAME,
    DATA_DIM_ARRAYS,
    EMBEDDING,
    SHARD_SUFFIX,
    SPLITS,
    TEACHER_TOKENS,
    CacheHeader,
    CacheRecord,
)
from maskteacher.cache_format.shard_table import ShardIndex
from maskteacher.cache_format.zarr_backend import ZarrShardWriter

BACKEND_WRITERS = {"zarr": ZarrShardWriter, "hdf5": Hdf5ShardWriter}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Most rows one array of a shard may hold (the index stores row offsets as int32).
MAX_ROWS = 2**31 - 1


class ShardWriter:
    """Writes one shard of a cache; exclusive per shard name (see the module docstring).

    ``add(record)`` takes a :class:`CacheRecord` whose ``teacher_logits`` are float32 (encoded
    here with the cache codec, recording quantisation statistics) or already in the stored dtype.
    """

    def __init__(self, root: str | os.PathLike[str], shard_name: str, *, split: str) -> None:
        self.root = os.fspath(root)
        self.header: CacheHeader = load_header(self.root)
        if split not in SPLITS:
            raise CacheError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if not NAME_RE.match(shard_name) or shard_name.endswith(
            (".json", ".lock", *SHARD_SUFFIX.values())
        ):
            raise CacheError(f"bad shard name {shard_name!r}: use letters, digits, '_', '-', '.'")
        self.name, self.split = shard_name, split
        suffix = SHARD_SUFFIX[self.header.backend]
        shards = os.path.join(self.root, SHARDS_DIR)
        self.final_path = os.path.join(shards, shard_name + suffix)
        self.temp_path = os.path.join(shards, TMP_PREFIX + shard_name + suffix)
        self.sidecar_path = os.path.join(shards, shard_name + ".json")
        self._lock = ExclusiveLock(
            os.path.join(shards, shard_name + ".lock"), f"shard {shard_name!r}"
        )
        try:
            if os.path.exists(self.final_path):
                raise CacheError(f"shard {shard_name!r} is already finished in {self.root}")
            remove_path(self.temp_path)  # left by a writer that died (we hold the lock now)
            with os_errors(f"shard {shard_name!r}"):
                self._backend = BACKEND_WRITERS[self.header.backend](self.temp_path)
        except BaseException:
            self._lock.release()
            raise
        self._index = ShardIndex(split=split)
        self._ids: set[str] = set()
        self._rows = {"teacher": 0, "gt": 0, "image": 0}
        self._specs: dict[str, ArraySpec] | None = None
        self._stats: list[dict[str, Any]] = []
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._index)

    def add(self, record: CacheRecord) -> None:
        """Append one image (see :class:`CacheRecord` for shapes); CacheError on bad input."""
        if self._closed:
            raise CacheError(f"shard {self.name!r} is already closed")
        check_record(record, self.header, self.split)
        if record.image_id in self._ids:
            raise CacheError(f"image {record.image_id!r} was already added to shard {self.name!r}")
        arrays, counts, stats = encode_record(record, self.header)
        specs = self._layout(arrays)
        starts = dict(self._rows)
        with os_errors(f"shard {self.name!r}"):
            for name, spec in specs.items():
                self._write_rows(
                    record.image_id, spec, starts[ARRAY_BY_NAME[name].space], arrays[name]
                )
        for space, n in counts.items():
            self._rows[space] += padded_rows(
                n, self.header.rows_per_chunk if space != "image" else 1
            )
            if self._rows[space] > MAX_ROWS:
                raise CacheError(
                    f"shard {self.name!r} holds more than {MAX_ROWS} {space} rows: use smaller shards"
                )
        if stats is not None:
            self._stats.append(stats)
        self._append_row(record, starts, counts)

    def _layout(self, arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        """The arrays of this shard, created on the first image (C of tokens / embedding from it)."""
        if self._specs is None:
            dims = {n: int(arrays[n].shape[1]) for n in DATA_DIM_ARRAYS if n in arrays}
            self._specs = array_specs(self.header, dims)
            with os_errors(f"shard {self.name!r}"):
                for spec in self._specs.values():
                    self._backend.create(spec)
            self._index.dims = {
                n: int(s.row_shape[0])
                for n, s in self._specs.items()
                if n in (TEACHER_TOKENS, EMBEDDING)
            }
        return self._specs

    def _write_rows(self, image_id: str, spec: ArraySpec, start: int, data: np.ndarray) -> None:
        if tuple(data.shape[1:]) != spec.row_shape:
            raise CacheError(
                f"image {image_id!r}: {spec.name} rows have shape {tuple(data.shape[1:])}, this shard stores {spec.row_shape}"
            )
        if data.shape[0]:
            rows = np.zeros(
                (padded_rows(data.shape[0], spec.chunk_rows), *spec.row_shape), np.dtype(spec.dtype)
            )
            rows[: data.shape[0]] = data
            self._backend.write(spec, start, rows)

    def _append_row(self, rec: CacheRecord, starts: dict[str, int], counts: dict[str, int]) -> None:
        idx = self._index
        idx.image_id.append(rec.image_id)
        idx.source.append(rec.source)
        idx.orig_hw.append([int(v) for v in rec.orig_hw])
        idx.input_hw.append([int(v) for v in rec.input_hw])
        idx.teacher_start.append(starts["teacher"])
        idx.teacher_count.append(counts["teacher"])
        idx.gt_start.append(starts["gt"])
        idx.gt_count.append(counts["gt"])
        self._ids.add(rec.image_id)

    def close(self) -> ShardEntry | None:
        """Finish the shard: table, checksums, rename, sidecar. Returns its entry (None, with
        nothing left on disk, when no image was added)."""
        if self._closed:
            return None
        if not len(self._index):
            self.abort()
            return None
        self._closed = True
        try:
            with os_errors(f"shard {self.name!r}"):
                return self._finish()
        except BaseException:
            remove_path(self.temp_path)
            raise
        finally:
            self._lock.release()

    def _finish(self) -> ShardEntry:
        idx = self._index
        idx.teacher_rows, idx.gt_rows = self._rows["teacher"], self._rows["gt"]
        idx.quant = (
            merge_quant_stats(self._stats, self.header.codec) if self.header.store.teacher else {}
        )
        self._backend.close(idx.to_json())
        files = checksum_shard(self.temp_path)
        if os.path.exists(self.final_path):
            raise CacheError(f"shard {self.name!r} appeared in {self.root} while we wrote it")
        os.rename(self.temp_path, self.final_path)
        fsync_dir(os.path.dirname(self.final_path))
        entry = shard_entry_of(
            self.header, idx, shard_rel_path(self.name, SHARD_SUFFIX[self.header.backend]), files
        )
        write_json_atomic(self.sidecar_path, entry.to_json())
        return entry

    def abort(self) -> None:
        """Discard the unfinished shard and release its lock."""
        if self._closed:
            return
        self._closed = True
        try:
            self._backend.abort()
        finally:
            remove_path(self.temp_path)
            self._lock.release()


def shard_entry_of(
    header: CacheHeader, idx: ShardIndex, rel: str, files: list[ShardFile]
) -> ShardEntry:
    """The sidecar entry of a finished shard from its table and file list."""
    return ShardEntry(
        path=rel,
        split=idx.split,
        backend=header.backend,
        images=len(idx),
        masks=int(sum(idx.teacher_count)),
        gt_masks=int(sum(idx.gt_count)),
        bytes=int(sum(f.bytes for f in files)),
        quant=idx.quant,
        files=files,
        image_ids=list(idx.image_id),
    )


def checksum_shard(path: str) -> list[ShardFile]:
    """sha256 and size of every file of a shard (a file: one entry with path '.'), fsynced."""
    if os.path.isfile(path):
        return [ShardFile(".", os.path.getsize(path), _sha256(path))]
    out = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            out.append(ShardFile(rel, os.path.getsize(full), _sha256(full)))
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
