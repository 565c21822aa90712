"""File-level checks of a shard: sizes and sha256 of the files its entry lists, files it does
not list, and links (a cache holds no symlinks; one resolving outside the root is never read).

Used by ``cache verify`` (every shard), by readers opened with ``verify_shards=True`` (each shard
the first time it is read from) and by ``cache merge`` (only listed files are copied).
"""

from __future__ import annotations

import hashlib
import os

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import ShardEntry
from maskteacher.cache_format.paths import check_relative_path
from maskteacher.cache_format.storage import ByteSource, LocalSource


def listed_files(entry: ShardEntry) -> list[tuple[str, int, str]]:
    """(path relative to the cache root, bytes, sha256) of every file the entry lists."""
    if entry.files is None:
        raise CacheError(f"shard {entry.path}: its file list is not loaded")
    out = []
    for f in entry.files:
        rel = entry.path if f.path == "." else f"{entry.path}/{f.path}"
        out.append((check_relative_path(rel, entry.path), f.bytes, f.sha256))
    return out


def file_digest(source: ByteSource, rel: str) -> tuple[int, str]:
    """(size, sha256) of one file of the cache (CacheError if unreadable or outside the root)."""
    h = hashlib.sha256()
    size = 0
    with source.open_binary(rel) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def shard_file_problems(
    source: ByteSource, entry: ShardEntry, *, unlisted: bool = True
) -> list[str]:
    """Everything wrong with the files of one shard, one message each (empty: all good)."""
    problems = []
    try:
        files = listed_files(entry)
    except CacheError as exc:
        return [str(exc)]
    for rel, size, sha in files:
        name = rel[len(entry.path) + 1 :] or rel
        try:
            got_size, digest = file_digest(source, rel)
        except CacheError as exc:
            problems.append(str(exc))
            continue
        if got_size != size:
            problems.append(f"file {name} has {got_size} bytes, the manifest says {size}")
        elif digest != sha:
            problems.append(f"file {name} fails its sha256 check (contents changed)")
    if unlisted and isinstance(source, LocalSource):
        problems.extend(_walk(source, entry, {rel for rel, _, _ in files}))
    return problems


def _walk(source: LocalSource, entry: ShardEntry, listed: set[str]) -> list[str]:
    """Unlisted files and any symlink inside the shard (a cache made by us holds no links)."""
    try:
        full = source.path(entry.path)
    except CacheError as exc:
        return [str(exc)]
    top = os.path.join(source.root, *entry.path.split("/"))
    if os.path.islink(top):
        return [f"{entry.path} is a symlink (a cache holds no links)"]
    problems = []
    for folder, dirs, names in os.walk(full):
        for name in sorted(dirs + names):
            path = os.path.join(folder, name)
            rel = entry.path + "/" + os.path.relpath(path, full).replace(os.sep, "/")
            if os.path.islink(path):
                problems.append(f"{rel} is a symlink (a cache holds no links)")
            elif name in names and rel not in listed:
                problems.append(f"file {rel} is not listed in the manifest")
    return problems
