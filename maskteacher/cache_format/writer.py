"""Writing a cache from many independent workers.

Protocol (docs/cache_format.md, "Writing"):

1. every worker calls :func:`init_cache` (creates ``cache_header.json`` or checks that the
   existing one matches, naming the first differing field);
2. each worker writes its own shards: ``with ShardWriter(root, name, split=...) as w: w.add(rec)``.
   A shard is built under ``shards/.tmp-<name>...``, renamed to ``shards/<name>.zarr|.h5`` when
   complete, then its sidecar ``shards/<name>.json`` (its manifest entry) is written atomically.
   ``shards/<name>.lock`` (created with O_EXCL, held with ``flock``) makes a second writer for
   the same name fail; a lock left by a dead writer is taken over because its flock died with it;
3. failed images go to :func:`record_failure` (``failures/<worker>.jsonl``);
4. after all workers are done, one process calls :func:`finalize` (or ``cache merge``), which
   builds ``manifest.json`` from the finished shards.

A killed worker loses only the shard it was writing; :func:`completed_ids` lists what the
finished shards hold (from the shards themselves, so it is right even if a sidecar is missing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Any

import numpy as np

from maskteacher.cache_format.codecs import encode_logits, merge_quant_stats, pack_masks
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.hdf5_backend import Hdf5ShardWriter
from maskteacher.cache_format.layout import ROW_SPACE, ArraySpec, array_specs, padded_rows
from maskteacher.cache_format.manifest import (
    FAILURES_DIR,
    HEADER_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    first_difference,
    load_header,
    parse_json,
    read_json_file,
    shard_rel_path,
    write_json_atomic,
)
from maskteacher.cache_format.reader import BACKEND_READERS
from maskteacher.cache_format.schema import (
    EMBEDDING,
    GT_MASKS,
    META_COLUMNS,
    SHARD_SUFFIX,
    SPLITS,
    TEACHER_LOGITS,
    TEACHER_META,
    TEACHER_TOKENS,
    CacheHeader,
    CacheRecord,
    Failure,
    Manifest,
    ShardEntry,
    ShardFile,
    ShardIndex,
)
from maskteacher.cache_format.storage import LocalSource
from maskteacher.cache_format.zarr_backend import ZarrShardWriter

BACKEND_WRITERS = {"zarr": ZarrShardWriter, "hdf5": Hdf5ShardWriter}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# Header


def init_cache(root: str | os.PathLike[str], header: CacheHeader) -> None:
    """Create the cache folder with ``header``, or check an existing one against it.

    Safe to call from every worker at once. A differing field raises CacheError naming the
    field and both values. Splits new to an existing cache are added to its fingerprints.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
    os.makedirs(os.path.join(root, FAILURES_DIR), exist_ok=True)
    path = os.path.join(root, HEADER_NAME)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        write_json_atomic(tmp, header.to_json())
        try:
            os.link(tmp, path)  # fails if another worker got there first
            return
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    with _exclusive(os.path.join(root, ".header.lock")):
        existing = load_header(root)
        diff = first_difference(existing, header)
        if diff is not None:
            name, have, want = diff
            raise CacheError(
                f"cache {root} was made with {name} = {have!r}, but this run has {want!r}; "
                "use another cache folder or the original settings"
            )
        new_splits = {
            s: fp for s, fp in header.fingerprints.items() if s not in existing.fingerprints
        }
        new_roots = {
            s: r for s, r in header.dataset_roots.items() if s not in existing.dataset_roots
        }
        if new_splits or new_roots:
            updated = existing.to_json()
            updated["fingerprints"] = {**existing.fingerprints, **new_splits}
            updated["dataset_roots"] = {**existing.dataset_roots, **new_roots}
            write_json_atomic(path, updated)


@contextlib.contextmanager
def _exclusive(path: str, timeout: float = 60.0) -> Any:
    """A short-lived flock for read-modify-write of small root files."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CacheError(f"timed out waiting for {path}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Shard locks


class ShardLock:
    """``shards/<name>.lock``: created with O_EXCL and held with an exclusive flock.

    Stale locks: if the file exists but nobody holds its flock (the writer died, even by
    SIGKILL, and the kernel dropped its lock), the new writer takes it over. If the holder is
    alive, CacheError names its pid and host. On a file system without working flock, delete a
    lock by hand once you are sure its writer is gone.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self._fd: int | None = None
        info = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        )
        for _ in range(20):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released meanwhile: try to create it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_text(fd)
                os.close(fd)
                raise CacheError(
                    f"{what} is being written by another process ({holder or 'unknown'}); "
                    f"lock file {path}"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            self._fd = fd
            return
        raise CacheError(f"could not take lock {path}")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _read_text(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Shard writer


class ShardWriter:
    """Writes one shard of a cache; exclusive per shard name (see module docstring).

    ``add(record)`` takes a :class:`CacheRecord` whose ``teacher_logits`` are float32 (encoded
    here with the cache codec, recording quantisation statistics) or already in the stored dtype.
    Leaving the ``with`` block normally finishes the shard; an exception discards it.
    """

    def __init__(self, root: str | os.PathLike[str], shard_name: str, *, split: str) -> None:
        self.root = os.fspath(root)
        self.header = load_header(self.root)
        if split not in SPLITS:
            raise CacheError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if not _NAME_RE.match(shard_name) or shard_name.endswith(
            (".json", ".lock", *SHARD_SUFFIX.values())
        ):
            raise CacheError(f"bad shard name {shard_name!r}: use letters, digits, '_', '-', '.'")
        self.name = shard_name
        self.split = split
        suffix = SHARD_SUFFIX[self.header.backend]
        shards = os.path.join(self.root, SHARDS_DIR)
        self.final_path = os.path.join(shards, shard_name + suffix)
        self.temp_path = os.path.join(shards, TMP_PREFIX + shard_name + suffix)
        self.sidecar_path = os.path.join(shards, shard_name + ".json")
        self._lock = ShardLock(os.path.join(shards, shard_name + ".lock"), f"shard {shard_name!r}")
        try:
            if os.path.exists(self.final_path):
                raise CacheError(f"shard {shard_name!r} is already finished in {self.root}")
            _remove(self.temp_path)  # left by a writer that died (we hold the lock now)
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
        arrays, counts = self._prepare(record)
        if self._specs is None:
            self._specs = array_specs(
                self.header,
                token_dim=None if record.tokens is None else int(np.shape(record.tokens)[1]),
                embed_dim=None if record.embedding is None else int(np.shape(record.embedding)[0]),
            )
            for spec in self._specs.values():
                self._backend.create(spec)
            self._index.dims = {
                name: int(spec.row_shape[0])
                for name, spec in self._specs.items()
                if name in (TEACHER_TOKENS, EMBEDDING)
            }
        starts = dict(self._rows)
        for name, spec in self._specs.items():
            data = arrays[name]
            if tuple(data.shape[1:]) != spec.row_shape:
                raise CacheError(
                    f"image {record.image_id!r}: {name} rows have shape {tuple(data.shape[1:])}, "
                    f"this shard stores {spec.row_shape}"
                )
            if data.shape[0]:
                rows = np.zeros(
                    (padded_rows(data.shape[0], spec.chunk_rows), *spec.row_shape),
                    np.dtype(spec.dtype),
                )
                rows[: data.shape[0]] = data
                self._backend.write(spec, starts[ROW_SPACE[name]], rows)
        for space, n in counts.items():
            chunk = self.header.rows_per_chunk if space != "image" else 1
            self._rows[space] += padded_rows(n, chunk)
        idx = self._index
        idx.image_id.append(record.image_id)
        idx.source.append(record.source)
        idx.orig_hw.append([int(v) for v in record.orig_hw])
        idx.input_hw.append([int(v) for v in record.input_hw])
        idx.teacher_start.append(starts["teacher"])
        idx.teacher_count.append(counts["teacher"])
        idx.gt_start.append(starts["gt"])
        idx.gt_count.append(counts["gt"])
        self._ids.add(record.image_id)

    def _prepare(self, rec: CacheRecord) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Check a record against the header and turn it into rows per array."""
        h = self.header
        low = h.low_res
        who = f"image {rec.image_id!r}"
        if not isinstance(rec.image_id, str) or not rec.image_id:
            raise CacheError(f"image_id must be a non-empty string, got {rec.image_id!r}")
        if rec.split != self.split:
            raise CacheError(
                f"{who}: split {rec.split!r} given to a writer of split {self.split!r}"
            )
        if rec.image_id in self._ids:
            raise CacheError(f"{who} was already added to shard {self.name!r}")
        if rec.source is not None and not isinstance(rec.source, str):
            raise CacheError(f"{who}: source must be a string or None")
        for name in ("orig_hw", "input_hw"):
            hw = np.asarray(getattr(rec, name))
            if hw.shape != (2,) or hw.dtype.kind not in "iu" or (hw <= 0).any():
                raise CacheError(f"{who}: {name} must be two positive ints, got {hw!r}")
        if max(int(v) for v in rec.input_hw) > h.image_size:
            raise CacheError(
                f"{who}: input_hw {list(rec.input_hw)} exceeds image_size {h.image_size}"
            )
        arrays: dict[str, np.ndarray] = {}
        n = int(np.shape(rec.teacher_logits)[0])
        if h.store.teacher:
            _shape(who, "teacher_logits", rec.teacher_logits, (n, low, low))
            stored, stats = encode_logits(rec.teacher_logits, h.codec)
            self._stats.append(stats)
            arrays[TEACHER_LOGITS] = stored
            meta = np.empty((n, len(META_COLUMNS)), np.float32)
            for cols, name, shape in (
                (slice(0, 2), "teacher_points", (n, 2)),
                (slice(2, 3), "teacher_iou", (n,)),
                (slice(3, 4), "teacher_stability", (n,)),
                (slice(4, 8), "teacher_boxes", (n, 4)),
            ):
                value = np.asarray(getattr(rec, name), np.float32)
                _shape(who, name, value, shape)
                meta[:, cols] = value.reshape(n, cols.stop - cols.start)
            if not np.isfinite(meta).all():
                raise CacheError(
                    f"{who}: teacher points/iou/stability/boxes contain NaN or infinity"
                )
            arrays[TEACHER_META] = meta
            if h.store.tokens:
                if rec.tokens is None:
                    raise CacheError(f"{who}: store.tokens is set but the record has no tokens")
                tokens = np.asarray(rec.tokens)
                _shape(who, "tokens", tokens, (n, tokens.shape[1] if tokens.ndim == 2 else -1))
                arrays[TEACHER_TOKENS] = _finite16(who, "tokens", tokens)
            elif rec.tokens is not None:
                raise CacheError(
                    f"{who}: record has tokens but the cache does not store them (store.tokens)"
                )
        elif n or rec.tokens is not None:
            raise CacheError(
                f"{who}: record has teacher masks but the cache stores none (store.teacher is false)"
            )
        m = int(np.shape(rec.gt_masks)[0])
        if h.store.gt:
            _shape(who, "gt_masks", rec.gt_masks, (m, low, low))
            arrays[GT_MASKS] = pack_masks(np.asarray(rec.gt_masks))
        elif m:
            raise CacheError(
                f"{who}: record has ground-truth masks but the cache stores none (store.gt is false)"
            )
        if h.store.embedding:
            if rec.embedding is None:
                raise CacheError(f"{who}: store.embedding is set but the record has no embedding")
            emb = np.asarray(rec.embedding)
            e = h.embed_size
            _shape(who, "embedding", emb, (emb.shape[0] if emb.ndim == 3 else -1, e, e))
            arrays[EMBEDDING] = _finite16(who, "embedding", emb)[None]
        elif rec.embedding is not None:
            raise CacheError(
                f"{who}: record has an embedding but the cache does not store them (store.embedding)"
            )
        counts = {
            "teacher": n if h.store.teacher else 0,
            "gt": m if h.store.gt else 0,
            "image": 1 if h.store.embedding else 0,
        }
        return arrays, counts

    def close(self) -> ShardEntry | None:
        """Finish the shard: index, checksums, rename, sidecar. Returns its manifest entry
        (None, with nothing left on disk, when no image was added)."""
        if self._closed:
            return None
        if not len(self._index):
            self.abort()
            return None
        self._closed = True
        try:
            idx = self._index
            idx.teacher_rows, idx.gt_rows = self._rows["teacher"], self._rows["gt"]
            idx.quant = (
                merge_quant_stats(self._stats, self.header.codec)
                if self.header.store.teacher
                else {}
            )
            self._backend.close(idx.to_json())
            files = checksum_shard(self.temp_path)
            if os.path.exists(self.final_path):
                raise CacheError(f"shard {self.name!r} appeared in {self.root} while we wrote it")
            os.rename(self.temp_path, self.final_path)
            _fsync_dir(os.path.dirname(self.final_path))
            entry = _entry(
                self.header,
                idx,
                shard_rel_path(self.name, SHARD_SUFFIX[self.header.backend]),
                files,
            )
            write_json_atomic(self.sidecar_path, entry.to_json())
            return entry
        except BaseException:
            _remove(self.temp_path)
            raise
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Discard the unfinished shard and release its lock."""
        if self._closed:
            return
        self._closed = True
        try:
            self._backend.abort()
        finally:
            _remove(self.temp_path)
            self._lock.release()


def _shape(who: str, name: str, value: Any, shape: tuple[int, ...]) -> None:
    got = tuple(np.shape(value))
    if len(got) != len(shape) or any(w >= 0 and g != w for g, w in zip(got, shape)):
        want = str(tuple(shape)).replace("-1", "C")
        raise CacheError(f"{who}: {name} has shape {got}, expected {want}")


def _finite16(who: str, name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind != "f":
        raise CacheError(f"{who}: {name} must be floating point, got {value.dtype}")
    out = value.astype(np.float16)
    if not np.isfinite(out).all():
        raise CacheError(f"{who}: {name} has NaN or values beyond the float16 range")
    return out


def _entry(header: CacheHeader, idx: ShardIndex, rel: str, files: list[ShardFile]) -> ShardEntry:
    return ShardEntry(
        path=rel,
        split=idx.split,
        backend=header.backend,
        image_ids=list(idx.image_id),
        images=len(idx),
        masks=int(sum(idx.teacher_count)),
        gt_masks=int(sum(idx.gt_count)),
        bytes=int(sum(f.bytes for f in files)),
        files=files,
        quant=idx.quant,
    )


def checksum_shard(path: str) -> list[ShardFile]:
    """sha256 and size of every file of a shard (a file: one entry with path '.'), fsynced."""
    if os.path.isfile(path):
        return [ShardFile(".", os.path.getsize(path), _sha256(path, sync=True))]
    out = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            out.append(ShardFile(rel, os.path.getsize(full), _sha256(full, sync=True)))
    return out


def _sha256(path: str, *, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# --------------------------------------------------------------------------------------------
# Names, failures, recovery, finalize


def new_shard_name(root: str | os.PathLike[str], worker: str) -> str:
    """``<worker>-<5-digit sequence>``, one past any shard, temp, lock or sidecar of that worker.

    Give each worker its own ``worker`` prefix (e.g. ``rank003`` or ``task0007``) so that names
    never collide between workers; a resumed worker continues its sequence.
    """
    if not _NAME_RE.match(worker):
        raise CacheError(f"bad worker name {worker!r}: use letters, digits, '_', '-', '.'")
    pattern = re.compile(rf"^(?:{re.escape(TMP_PREFIX)})?{re.escape(worker)}-(\d+)(?:\.|$)")
    highest = -1
    folder = os.path.join(os.fspath(root), SHARDS_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.match(name)
        if match:
            highest = max(highest, int(match.group(1)))
    return f"{worker}-{highest + 1:05d}"


def record_failure(
    root: str | os.PathLike[str], worker_name: str, image_id: str, split: str, reason: str
) -> None:
    """Note an image the worker could not process; ``finalize`` lists it in the manifest
    unless a shard holds it after all."""
    if not _NAME_RE.match(worker_name):
        raise CacheError(f"bad worker name {worker_name!r}: use letters, digits, '_', '-', '.'")
    line = json.dumps(
        Failure(str(image_id), str(split), " ".join(str(reason).split()), worker_name).to_json()
    )
    folder = os.path.join(os.fspath(root), FAILURES_DIR)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(
        os.path.join(folder, worker_name + ".jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def finished_shards(root: str) -> list[str]:
    """Names (without suffix) of the finished shards under ``root/shards``, sorted."""
    header = load_header(root)
    suffix = SHARD_SUFFIX[header.backend]
    folder = os.path.join(root, SHARDS_DIR)
    names = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(suffix) and not name.startswith(TMP_PREFIX):
            names.append(name[: -len(suffix)])
    return names


def shard_entry(root: str, name: str, header: CacheHeader, *, repair: bool) -> ShardEntry:
    """A finished shard's manifest entry: from its sidecar, or rebuilt from the shard itself
    (after a crash between rename and sidecar); ``repair`` writes the rebuilt sidecar."""
    suffix = SHARD_SUFFIX[header.backend]
    rel = shard_rel_path(name, suffix)
    sidecar = os.path.join(root, SHARDS_DIR, name + ".json")
    if os.path.exists(sidecar):
        entry = ShardEntry.from_json(read_json_file(sidecar, "shard sidecar"), sidecar)
        if entry.path != rel:
            raise CacheError(f"{sidecar}: path {entry.path!r} does not match its shard {rel!r}")
        return entry
    source = LocalSource(root)
    backend = BACKEND_READERS[header.backend](source, rel)
    idx = ShardIndex.from_json(backend.read_index(), source.describe(rel))
    backend.close()
    source.close()
    entry = _entry(header, idx, rel, checksum_shard(os.path.join(root, SHARDS_DIR, name + suffix)))
    if repair:
        write_json_atomic(sidecar, entry.to_json())
    return entry


def completed_ids(root: str | os.PathLike[str]) -> dict[str, set[str]]:
    """Image ids held by the finished shards, per split (what a resumed precompute skips)."""
    root = os.fspath(root)
    header = load_header(root)
    done: dict[str, set[str]] = {}
    for name in finished_shards(root):
        entry = shard_entry(root, name, header, repair=False)
        done.setdefault(entry.split, set()).update(entry.image_ids)
    return done


def scan_cache(root: str | os.PathLike[str], *, repair: bool = False) -> Manifest:
    """The manifest of a cache folder built from its header, finished shards and failures."""
    root = os.fspath(root)
    header = load_header(root)
    shards = [shard_entry(root, name, header, repair=repair) for name in finished_shards(root)]
    owner: dict[tuple[str, str], str] = {}
    for entry in shards:
        for image_id in entry.image_ids:
            key = (entry.split, image_id)
            if key in owner:
                raise CacheError(
                    f"image {image_id!r} ({entry.split}) is in two shards: {owner[key]} and {entry.path}"
                )
            owner[key] = entry.path
    return Manifest(header=header, shards=shards, failures=_failures(root, owner))


def _failures(root: str, done: dict[tuple[str, str], str]) -> list[Failure]:
    folder = os.path.join(root, FAILURES_DIR)
    latest: dict[tuple[str, str], Failure] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            for k, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    failure = Failure.from_json(
                        parse_json(line, f"{path}:{k + 1}"), f"{path}:{k + 1}"
                    )
                except CacheError:
                    continue  # a line cut short by a killed worker
                latest[(failure.split, failure.image_id)] = failure
    return [f for key, f in sorted(latest.items()) if key not in done]


def finalize(root: str | os.PathLike[str]) -> Manifest:
    """Build ``manifest.json`` (atomically) from the finished shards; call once all writers are
    done (rank 0 after a barrier). Rewrites missing sidecars. Returns the manifest."""
    root = os.fspath(root)
    manifest = scan_cache(root, repair=True)
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest.to_json())
    return manifest
