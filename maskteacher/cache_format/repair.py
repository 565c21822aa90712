"""``cache repair``: keep one copy of every image a cache holds more than once, then finalize.

How a cache gets there: two writers that planned the same images (before writer locks existed,
two ``maskteacher precompute`` processes started a second apart on one cache) each finished a
shard holding them; ``finalize``, training and ``cache merge`` then refuse the cache. Both copies
were made with the same header (same teacher and settings), so either is right: the copy in the
shard that sorts first by name is kept. A later shard holding only such copies is deleted; one
that also holds other images is rewritten without the copies (stored bytes are copied, not
re-quantised) under ``<name>.dedup`` and the original removed (a ``.dedup`` shard left beside
its original by an interrupted repair is discarded and redone). Then the manifest is rebuilt.
Refused while a precompute writes the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.locks import writer_lock
from maskteacher.cache_format.manifest import Manifest, ShardEntry, load_header
from maskteacher.cache_format.paths import SHARDS_DIR, sidecar_rel_path
from maskteacher.cache_format.raw import RawRecord, decode_raw
from maskteacher.cache_format.schema import SHARD_SUFFIX, CacheHeader
from maskteacher.cache_format.shard_reader import ImageRows, ShardReader
from maskteacher.cache_format.shard_writer import ShardWriter, remove_path
from maskteacher.cache_format.storage import LocalSource
from maskteacher.cache_format.writer import finalize, finished_shards, shard_entry

DEDUP = ".dedup"


@dataclass
class RepairReport:
    """What ``cache repair`` changed: copies dropped, shards deleted / rewritten, the manifest."""

    copies_dropped: int = 0
    shards_deleted: list[str] = field(default_factory=list)
    shards_rewritten: list[str] = field(default_factory=list)
    manifest: Manifest | None = None


def repair_cache(root: str | os.PathLike[str]) -> RepairReport:
    """Drop duplicate copies in the local cache ``root`` (module docstring) and finalize it."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise CacheError(f"cache folder not found: {root}")
    lock = writer_lock(root, "repair", "repair")
    try:
        header = load_header(root)
        report = RepairReport()
        owned: set[tuple[str, str]] = set()
        names = finished_shards(root, header)
        for name in [n for n in names if n.endswith(DEDUP) and n[: -len(DEDUP)] in names]:
            _remove_shard(root, shard_entry(root, name, header, repair=True))  # a crashed repair's
            names.remove(name)
        for name in names:
            entry = shard_entry(root, name, header, repair=True)
            ids = entry.image_ids or []
            copies = [i for i in ids if (entry.split, i) in owned]
            owned.update((entry.split, i) for i in ids)
            if not copies:
                continue
            report.copies_dropped += len(copies)
            if len(copies) == len(ids):
                report.shards_deleted.append(entry.path)
            else:
                report.shards_rewritten.append(_rewrite(root, header, name, entry, set(copies)))
            _remove_shard(root, entry)
        report.manifest = finalize(root)
        return report
    finally:
        lock.release()


def _rewrite(root: str, header: CacheHeader, name: str, entry: ShardEntry, drop: set[str]) -> str:
    """Write shard ``<name>.dedup`` with the images of ``entry`` not in ``drop``; its path."""
    reader = ShardReader(LocalSource(root), entry, header, None)
    table = reader.table()
    new_name = name + DEDUP
    with ShardWriter(root, new_name, split=entry.split) as writer:
        for k, image_id in enumerate(table.image_id):
            if image_id in drop:
                continue
            rows = ImageRows(
                k,
                table.teacher_start[k],
                table.teacher_count[k],
                table.gt_start[k],
                table.gt_count[k],
            )
            raw = RawRecord(
                image_id,
                table.split,
                entry.path,
                tuple(table.orig_hw[k]),
                tuple(table.input_hw[k]),
                table.source[k],
                header.low_res,
                header.codec.stored_dtype.str,
                reader.fetch(rows),
            )
            writer.add(decode_raw(raw))
    reader.close()
    return f"{SHARDS_DIR}/{new_name}{SHARD_SUFFIX[header.backend]}"


def _remove_shard(root: str, entry: ShardEntry) -> None:
    """Sidecar first, then the shard (a crash in between leaves a shard ``finalize`` re-lists)."""
    sidecar = sidecar_rel_path(entry.path, SHARD_SUFFIX[entry.backend])
    remove_path(os.path.join(root, *sidecar.split("/")))
    remove_path(os.path.join(root, *entry.path.split("/")))
