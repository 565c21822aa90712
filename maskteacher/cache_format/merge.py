"""``cache merge``: combine the caches of many workers (or many runs) into one cache folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import (
    FAILURES_DIR,
    HEADER_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    first_difference,
    resolve_local,
    shard_rel_path,
    write_json_atomic,
)
from maskteacher.cache_format.reader import load_manifest
from maskteacher.cache_format.schema import SHARD_SUFFIX, CacheHeader, Manifest, ShardEntry
from maskteacher.cache_format.storage import LocalSource
from maskteacher.cache_format.writer import TMP_PREFIX, _remove, finalize, init_cache, scan_cache


def _load(root: str) -> Manifest:
    """What a local cache folder holds now: scanned read-only from its header, shards, sidecars
    and failure logs (so shards finished after its last finalize count too); a folder with only
    a manifest (no header) is taken as its manifest says."""
    if not os.path.isdir(root):
        raise CacheError(f"cache folder not found: {root}")
    if os.path.exists(os.path.join(root, HEADER_NAME)):
        return scan_cache(root)
    if os.path.exists(os.path.join(root, MANIFEST_NAME)):
        return load_manifest(LocalSource(root))
    raise CacheError(f"{root} is not a cache (no {MANIFEST_NAME} or {HEADER_NAME})")


def _signature(entry: ShardEntry) -> tuple[Any, ...]:
    return (entry.split, tuple(entry.image_ids), tuple((f.path, f.sha256) for f in entry.files))


def merge_caches(
    out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, link: bool = True
) -> Manifest:
    """Merge local caches ``inputs`` into ``out`` (created, or an existing compatible cache).

    Refuses caches whose generation settings differ (naming the field) and images present in
    two shards. Shards are hard-linked (``link``; copied across file systems or with
    ``link=False``) under temporary names and renamed; a shard already in ``out`` with the same
    content is skipped, so an interrupted merge can simply be run again. ``manifest.json`` is
    written last, atomically.
    """
    out = os.fspath(out)
    if not inputs:
        raise CacheError("cache merge needs at least one input cache")
    sources = [os.fspath(p) for p in inputs]
    manifests = [_load(p) for p in sources]
    existing = _load(out) if os.path.exists(os.path.join(out, HEADER_NAME)) else None
    header = _merged_header([(out, existing)] if existing else [], list(zip(sources, manifests)))
    owner: dict[tuple[str, str], str] = {}
    have: dict[tuple[Any, ...], ShardEntry] = {}
    if existing is not None:
        for entry in existing.shards:
            have[_signature(entry)] = entry
            _claim(owner, entry, out)
    plan: list[tuple[str, ShardEntry]] = []
    for src, manifest in zip(sources, manifests):
        for entry in manifest.shards:
            sig = _signature(entry)
            if sig in have:
                continue  # the same shard is already there (or listed twice)
            have[sig] = entry
            _claim(owner, entry, src)
            plan.append((src, entry))
    init_cache(out, header)
    taken = set(os.listdir(os.path.join(out, SHARDS_DIR)))
    suffix = SHARD_SUFFIX[header.backend]
    for src, entry in plan:
        _copy_shard(src, out, entry, _free_name(entry, suffix, taken), suffix, link=link)
    for k, (src, manifest) in enumerate(zip(sources, manifests)):
        if manifest.failures:
            _write_failures(
                out, f"merged-{k:03d}-{os.path.basename(os.path.abspath(src))}", manifest
            )
    return finalize(out)


def _merged_header(
    existing: list[tuple[str, Manifest | None]], inputs: list[tuple[str, Manifest]]
) -> CacheHeader:
    named = [(p, m) for p, m in existing if m is not None] + inputs
    ref_path, ref = named[0][0], named[0][1].header
    fingerprints, roots = dict(ref.fingerprints), dict(ref.dataset_roots)
    for path, manifest in named[1:]:
        diff = first_difference(ref, manifest.header)
        if diff is not None:
            field_name, a, b = diff
            raise CacheError(
                f"cannot merge {path} into {ref_path}: {field_name} is {b!r} there but {a!r} here"
            )
        for split, fp in manifest.header.fingerprints.items():
            if fingerprints.setdefault(split, fp) != fp:
                raise CacheError(
                    f"cannot merge {path}: dataset fingerprint of split {split!r} differs"
                )
        for split, root in manifest.header.dataset_roots.items():
            roots.setdefault(split, root)
    return dataclasses.replace(ref, fingerprints=fingerprints, dataset_roots=roots)


def _claim(owner: dict[tuple[str, str], str], entry: ShardEntry, cache: str) -> None:
    for image_id in entry.image_ids:
        key = (entry.split, image_id)
        here = f"{cache}/{entry.path}"
        if key in owner:
            raise CacheError(
                f"image {image_id!r} ({entry.split}) is in both {owner[key]} and {here}: refusing to merge duplicates"
            )
        owner[key] = here


def _free_name(entry: ShardEntry, suffix: str, taken: set[str]) -> str:
    base = os.path.basename(entry.path)[: -len(suffix)]
    name, n = base, 1
    while any(f"{name}{ext}" in taken for ext in (suffix, ".json", ".lock")):
        name = f"{base}-m{n}"
        n += 1
    taken.update({f"{name}{suffix}", f"{name}.json"})
    return name


def _copy_shard(
    src_root: str, out: str, entry: ShardEntry, name: str, suffix: str, *, link: bool
) -> None:
    src = resolve_local(src_root, entry.path, src_root)
    if not os.path.exists(src):
        raise CacheError(f"shard {entry.path} listed by {src_root} is missing")
    shards = os.path.join(out, SHARDS_DIR)
    tmp = os.path.join(shards, TMP_PREFIX + name + suffix)
    final = os.path.join(shards, name + suffix)
    _remove(tmp)
    try:
        if os.path.isdir(src):
            shutil.copytree(src, tmp, copy_function=_linker(link))
        else:
            _linker(link)(src, tmp)
        os.rename(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    moved = dataclasses.replace(entry, path=shard_rel_path(name, suffix))
    write_json_atomic(os.path.join(shards, name + ".json"), moved.to_json())


def _linker(link: bool) -> Any:
    def place(src: str, dst: str) -> str:
        if link:
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass  # another file system, or links not allowed: copy instead
        shutil.copy2(src, dst)
        return dst

    return place


def _write_failures(out: str, name: str, manifest: Manifest) -> None:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    lines = "".join(json.dumps(f.to_json()) + "\n" for f in manifest.failures)
    path = os.path.join(out, FAILURES_DIR, safe + ".jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(lines)
    os.replace(tmp, path)
