"""Names inside a cache folder and the rule that every path stays inside the cache root.

Paths in JSON documents are relative, '/'-separated, without '.', '..' or empty parts; on a
local file system a path is also refused when symlinks make it resolve outside the root.
"""

from __future__ import annotations

import os
import posixpath

from maskteacher.cache_format.errors import CacheError

MANIFEST_NAME = "manifest.json"
HEADER_NAME = "cache_header.json"
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"
INDEX_DIR = "index"
#: Prefix of a shard (or index) being written; readers ignore it.
TMP_PREFIX = ".tmp-"


def check_relative_path(rel: str, where: str) -> str:
    """A manifest path must be relative, '/'-separated, and stay inside the cache root."""
    if not rel or "\\" in rel or "\x00" in rel:
        raise CacheError(f"{where}: bad path {rel!r}")
    if rel.startswith("/") or posixpath.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise CacheError(
            f"{where}: path {rel!r} is absolute; paths must be relative to the cache root"
        )
    if any(p in ("", ".", "..") for p in rel.split("/")):
        raise CacheError(f"{where}: path {rel!r} must not contain '..', '.' or empty parts")
    return rel


def resolve_local(root: str, rel: str, where: str) -> str:
    """Join ``rel`` to a local cache root; refuse it if symlinks make it resolve outside."""
    check_relative_path(rel, where)
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, *rel.split("/")))
    if os.path.commonpath([real_root, full]) != real_root:
        raise CacheError(f"{where}: path {rel!r} resolves outside the cache root ({full})")
    return full


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (after resolving symlinks)."""
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([a, b]) == b


def shard_rel_path(name: str, suffix: str) -> str:
    return f"{SHARDS_DIR}/{name}{suffix}"


def sidecar_rel_path(shard_rel: str, suffix: str) -> str:
    """``shards/<name>.json`` for the shard ``shards/<name><suffix>``."""
    return shard_rel[: -len(suffix)] + ".json"
