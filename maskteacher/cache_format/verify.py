"""``cache verify``: check every byte of a cache, shards in parallel.

Two passes per shard, separable: the *checksum* pass recomputes the size and sha256 of every
file the shard's entry lists and reports unlisted files and links; the *decode* pass reads the
shard's own table (compared with the cache index), checks its arrays against the manifest's
layout and decodes every image (every chunk's crc32c / fletcher32). Cache-wide checks come
first: the manifest, every index column (crc32c and sha256), the teacher decoder weights file
(size and sha256, when the cache has one) and ids listed twice in one split.
Shards are spread over ``jobs`` processes (forked from a single-threaded caller, else spawned).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskteacher.cache_format.checks import file_digest, shard_file_problems
from maskteacher.cache_format.decoder_file import read_decoder_weights
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.index import CacheIndex
from maskteacher.cache_format.manifest import Manifest, load_manifest, load_sidecar
from maskteacher.cache_format.paths import MANIFEST_NAME, sidecar_rel_path
from maskteacher.cache_format.raw import RawRecord, decode_raw
from maskteacher.cache_format.reader import load_index
from maskteacher.cache_format.schema import SHARD_SUFFIX, SPLITS
from maskteacher.cache_format.shard_reader import ImageRows, ShardReader
from maskteacher.cache_format.storage import ByteSource, make_source


@dataclass
class Problem:
    """One thing wrong with a cache: where (a shard path or manifest.json), image, what."""

    where: str
    image_id: str | None
    message: str

    def __str__(self) -> str:
        image = f" image {self.image_id!r}:" if self.image_id is not None else ""
        return f"{self.where}:{image} {self.message}"


@dataclass
class VerifyReport:
    path: str
    shards: int = 0
    images: int = 0
    images_ok: int = 0
    files: int = 0
    decoded: bool = True
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "shards": self.shards,
            "files": self.files,
            "images": self.images,
            "images_ok": self.images_ok if self.decoded else None,
            "problems": [
                {"where": p.where, "image_id": p.image_id, "message": p.message}
                for p in self.problems
            ],
        }


def default_jobs() -> int:
    """Processes ``cache verify`` uses by default: the CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def verify_cache(
    path: str | os.PathLike[str],
    *,
    progress: bool = True,
    jobs: int | None = 1,
    checksums_only: bool = False,
) -> VerifyReport:
    """Check ``path`` (module docstring) and collect every problem; never raises for a bad
    cache (one whose manifest cannot be read is a problem of ``manifest.json``).

    jobs: processes for the shards (None: :func:`default_jobs`); checksums_only: skip decoding.
    """
    source = make_source(path)
    report = VerifyReport(path=source.describe(), decoded=not checksums_only)
    try:
        manifest = load_manifest(source)
    except CacheError as exc:
        report.problems.append(Problem(MANIFEST_NAME, None, str(exc)))
        return report
    report.shards, report.images = len(manifest.shards), manifest.images
    index = _check_index(source, manifest, report)
    report.problems.extend(_duplicates(manifest, index))
    if manifest.decoder is not None:
        try:
            read_decoder_weights(source, manifest.decoder)
            report.files += 1
        except CacheError as exc:
            report.problems.append(Problem(manifest.decoder.path, None, str(exc)))
    jobs = min(default_jobs() if jobs is None else max(1, jobs), max(1, len(manifest.shards)))
    bar = None  # made after the worker pool (its monitor thread would make fork unsafe)
    for k, (files, ok, problems) in _run_shards(
        os.fspath(path), manifest, index, jobs, checksums_only
    ):
        if bar is None:
            bar = _progress(
                manifest.images, progress, "verify checksums" if checksums_only else "verify"
            )
        report.files += files
        report.images_ok += ok
        report.problems.extend(problems)
        bar.update(manifest.shards[k].images)
    if bar is not None:
        bar.close()
    return report


def _check_index(source: ByteSource, manifest: Manifest, report: VerifyReport) -> CacheIndex | None:
    """Load every index column (crc32c) and check its sha256; problems go to ``report``."""
    if manifest.index is None:
        return None
    info = manifest.index
    where = info.path
    try:
        index = load_index(source, manifest, refuse_duplicates=False)
        for name, want in sorted(info.columns.items()):
            index.col(name)
            size, sha = file_digest(source, f"{info.path}/{name}.npy")
            if (size, sha) != (want.bytes, want.sha256):
                raise CacheError(f"index column {name} fails its sha256 check")
        return index
    except CacheError as exc:
        report.problems.append(Problem(where, None, str(exc)))
        return None


def _duplicates(manifest: Manifest, index: CacheIndex | None) -> list[Problem]:
    """Ids listed more than once in one split (by the format-1 manifest, or the index)."""
    owners: dict[tuple[str, str], list[str]] = {}
    if manifest.version == 1:
        for entry in manifest.shards:
            for image_id in entry.image_ids or []:
                owners.setdefault((entry.split, image_id), []).append(entry.path)
    elif index is not None:
        shard_col = index.col("shard")
        for split, image_id, positions in index.duplicates():
            owners[(split, image_id)] = [manifest.shards[int(shard_col[p])].path for p in positions]
    return [
        Problem(
            MANIFEST_NAME,
            image_id,
            f"listed {len(paths)} times in split {split!r}: in {', '.join(paths)}; keep one copy with 'maskteacher cache repair'",
        )
        for (split, image_id), paths in sorted(owners.items())
        if len(paths) > 1
    ]


def _run_shards(
    path: str, manifest: Manifest, index: CacheIndex | None, jobs: int, checksums_only: bool
) -> Any:
    """Yield ``(k, (files, images ok, problems))`` for every shard, in completion order."""
    if jobs <= 1:
        global _CONTEXT
        _CONTEXT = (make_source(path), manifest, index)
        for k in range(len(manifest.shards)):
            yield k, _shard_task(k, checksums_only)
        _CONTEXT = None
        return
    with ProcessPoolExecutor(
        jobs, mp_context=_pool_context(), initializer=_init_worker, initargs=(path,)
    ) as pool:
        futures = {
            pool.submit(_shard_task, k, checksums_only): k for k in range(len(manifest.shards))
        }
        for future in as_completed(futures):
            yield futures[future], future.result()


_CONTEXT: tuple[ByteSource, Manifest, CacheIndex | None] | None = None


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process runs a single thread (workers start at once, nothing to import),
    spawn otherwise (forking a multi-threaded process could inherit a held lock)."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _init_worker(path: str) -> None:
    global _CONTEXT
    source = make_source(path)
    manifest = load_manifest(source)
    try:
        index = load_index(source, manifest, refuse_duplicates=False) if manifest.index else None
    except CacheError:
        index = None  # reported by the parent
    _CONTEXT = (source, manifest, index)


def _shard_task(k: int, checksums_only: bool) -> tuple[int, int, list[Problem]]:
    """Both passes over shard ``k`` (in a worker process or in-process)."""
    assert _CONTEXT is not None
    source, manifest, index = _CONTEXT
    entry = manifest.shards[k]
    try:
        if entry.files is None:
            entry = load_sidecar(
                source, entry, sidecar_rel_path(entry.path, SHARD_SUFFIX[entry.backend])
            )
        problems = [Problem(entry.path, None, m) for m in shard_file_problems(source, entry)]
    except CacheError as exc:
        return 0, 0, [Problem(entry.path, None, str(exc))]
    files = len(entry.files or [])
    if checksums_only:
        return files, 0, problems
    ok, decode_problems = _decode_shard(source, manifest, index, k, entry)
    return files, ok, problems + decode_problems


def _decode_shard(
    source: ByteSource, manifest: Manifest, index: CacheIndex | None, k: int, entry: Any
) -> tuple[int, list[Problem]]:
    reader = ShardReader(source, entry, manifest.header, None)
    try:
        table = reader.table()
        specs = reader.stored_specs()
        if manifest.layout is not None and {n: s.to_json() for n, s in specs.items()} != {
            n: manifest.layout[n].to_json() for n in specs if n in manifest.layout
        }:
            raise CacheError("its arrays are not laid out as the manifest says")
        if index is not None:
            _compare_with_index(table, index, k)
    except CacheError as exc:
        reader.close()
        return 0, [Problem(entry.path, None, f"cannot read the shard: {exc}")]
    ok, problems = 0, []
    for local, image_id in enumerate(table.image_id):
        rows = ImageRows(
            local,
            table.teacher_start[local],
            table.teacher_count[local],
            table.gt_start[local],
            table.gt_count[local],
        )
        try:
            raw = RawRecord(
                image_id,
                table.split,
                entry.path,
                tuple(table.orig_hw[local]),
                tuple(table.input_hw[local]),
                table.source[local],
                manifest.header.low_res,
                manifest.header.codec.stored_dtype.str,
                reader.fetch(rows),
            )
            decode_raw(raw)
            ok += 1
        except CacheError as exc:
            text = str(exc).removeprefix(f"shard {entry.path}: image {image_id!r}: ")
            problems.append(Problem(entry.path, image_id, text))
    reader.close()
    return ok, problems


def _compare_with_index(table: Any, index: CacheIndex, k: int) -> None:
    """CacheError when the shard's own table and the cache index disagree about shard ``k``."""
    positions = np.flatnonzero(index.col("shard") == k)
    if positions.size != len(table):
        raise CacheError(f"its table lists {len(table)} images, the cache index {positions.size}")
    for name in ("teacher_start", "teacher_count", "gt_start", "gt_count", "orig_hw", "input_hw"):
        if not np.array_equal(
            index.col(name)[positions],
            np.asarray(getattr(table, name)).reshape(index.col(name)[positions].shape),
        ):
            raise CacheError(f"its table and the cache index disagree about {name}")
    ids = [index.image_id(int(p)) for p in positions]
    codes = {int(c) for c in index.col("split")[positions]}
    if ids != table.image_id or codes != {SPLITS.index(table.split)}:
        raise CacheError("its table and the cache index disagree about image ids or split")


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)
