"""``cache merge``: combine the caches of many workers (or many runs) into one cache folder.

Only the files a shard's entry lists are copied (hard-linked when possible), each resolved
inside its source cache: a file or directory reached through a symlink that leads outside a
source cache is refused, anything unlisted (a stray key file, a symlinked folder) is left behind,
and the merged cache holds no links.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from maskteacher.cache_format.checks import listed_files
from maskteacher.cache_format.decoder_file import copy_decoder_file
from maskteacher.cache_format.errors import CacheError, os_errors
from maskteacher.cache_format.identity import header_mismatch
from maskteacher.cache_format.jsonio import write_bytes_atomic
from maskteacher.cache_format.manifest import Manifest, ShardEntry, load_manifest, load_sidecar
from maskteacher.cache_format.paths import (
    FAILURES_DIR,
    HEADER_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    TMP_PREFIX,
    inside,
    resolve_local,
    shard_rel_path,
    sidecar_rel_path,
)
from maskteacher.cache_format.schema import FORMAT_VERSION, SHARD_SUFFIX, CacheHeader
from maskteacher.cache_format.shard_writer import remove_path
from maskteacher.cache_format.storage import LocalSource
from maskteacher.cache_format.writer import CacheScan, finalize, init_cache, scan_cache


def load_folder(root: str) -> CacheScan:
    """What a local cache folder holds now: scanned read-only from its header, shards, sidecars
    and failure logs (so shards finished after its last finalize count too); a folder with only
    a manifest (no header) is taken as its manifest and sidecars say."""
    if not os.path.isdir(root):
        raise CacheError(f"cache folder not found: {root}")
    if os.path.exists(os.path.join(root, HEADER_NAME)):
        scan = scan_cache(root)
    elif os.path.exists(os.path.join(root, MANIFEST_NAME)):
        scan = _from_manifest(root, load_manifest(LocalSource(root)))
    else:
        raise CacheError(f"{root} is not a cache (no {MANIFEST_NAME} or {HEADER_NAME})")
    if scan.header.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{root} is a format-{scan.header.format_version} cache; convert it first with "
            f"'maskteacher cache upgrade {root}'"
        )
    return scan


def _from_manifest(root: str, manifest: Manifest) -> CacheScan:
    source = LocalSource(root)
    shards = [
        e
        if e.files is not None
        else load_sidecar(source, e, sidecar_rel_path(e.path, SHARD_SUFFIX[e.backend]))
        for e in manifest.shards
    ]
    return CacheScan(manifest.header, shards, list(manifest.failures))


def _signature(entry: ShardEntry) -> tuple[Any, ...]:
    files = tuple((f.path, f.sha256) for f in entry.files or [])
    return (entry.split, tuple(entry.image_ids or []), files)


def merge_caches(
    out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, link: bool = True
) -> Manifest:
    """Merge local caches ``inputs`` into ``out`` (created, or an existing compatible cache).

    Refuses caches whose generation settings differ (naming the field), images present in two
    shards, and an ``out`` inside a dataset folder the caches were made from. Shards are
    hard-linked (``link``; copied across file systems or with ``link=False``) under temporary
    names and renamed; a shard already in ``out`` with the same content is skipped, so an
    interrupted merge can simply be run again. ``manifest.json`` is written last, atomically.
    """
    out = os.fspath(out)
    if not inputs:
        raise CacheError("cache merge needs at least one input cache")
    sources = [os.fspath(p) for p in inputs]
    scans = [load_folder(p) for p in sources]
    existing = load_folder(out) if os.path.exists(os.path.join(out, HEADER_NAME)) else None
    header = _merged_header([(out, existing)] if existing else [], list(zip(sources, scans)))
    for split, root in sorted(header.dataset_roots.items()):
        if inside(out, root):
            raise CacheError(
                f"cache merge: {out} is inside the dataset folder {root} ({split}); put the cache elsewhere"
            )
    plan = _plan(out, existing, list(zip(sources, scans)))
    init_cache(out, header)
    suffix = SHARD_SUFFIX[header.backend]
    taken = set(os.listdir(os.path.join(out, SHARDS_DIR)))
    with os_errors(f"merged cache {out}"):
        for src, entry in plan:
            _copy_shard(src, out, entry, _free_name(entry, suffix, taken), suffix, link=link)
        for k, (src, scan) in enumerate(zip(sources, scans)):
            if scan.failures:
                _write_failures(
                    out, f"merged-{k:03d}-{os.path.basename(os.path.abspath(src))}", scan
                )
        for src in sources:  # the teacher's decoder weights: the same file in every input
            copy_decoder_file(src, out)
    return finalize(out)


def _plan(
    out: str, existing: CacheScan | None, inputs: list[tuple[str, CacheScan]]
) -> list[tuple[str, ShardEntry]]:
    """The shards to copy, refusing an image held by two different shards."""
    owner: dict[tuple[str, str], str] = {}
    have: dict[tuple[Any, ...], ShardEntry] = {}
    for entry in existing.shards if existing else []:
        have[_signature(entry)] = entry
        _claim(owner, entry, out)
    plan = []
    for src, scan in inputs:
        for entry in scan.shards:
            sig = _signature(entry)
            if sig in have:
                continue  # the same shard is already there (or listed twice)
            have[sig] = entry
            _claim(owner, entry, src)
            plan.append((src, entry))
    return plan


def _merged_header(
    existing: list[tuple[str, CacheScan | None]], inputs: list[tuple[str, CacheScan]]
) -> CacheHeader:
    named = [(p, m) for p, m in existing if m is not None] + inputs
    ref_path, ref = named[0][0], named[0][1].header
    fingerprints, roots = dict(ref.fingerprints), dict(ref.dataset_roots)
    for path, scan in named[1:]:
        diff = header_mismatch(ref, scan.header, layout=True)
        if diff is not None:
            raise CacheError(
                f"cannot merge {path} into {ref_path}: {diff.field} is {diff.want!r} there but {diff.have!r} here"
            )
        for split, fp in scan.header.fingerprints.items():
            if fingerprints.setdefault(split, fp) != fp:
                raise CacheError(
                    f"cannot merge {path}: dataset fingerprint of split {split!r} differs"
                )
        for split, root in scan.header.dataset_roots.items():
            roots.setdefault(split, root)
    return dataclasses.replace(ref, fingerprints=fingerprints, dataset_roots=roots)


def _claim(owner: dict[tuple[str, str], str], entry: ShardEntry, cache: str) -> None:
    for image_id in entry.image_ids or []:
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
    """Place the listed files of ``entry`` (resolved inside ``src_root``) as shard ``name``."""
    shards = os.path.join(out, SHARDS_DIR)
    tmp = os.path.join(shards, TMP_PREFIX + name + suffix)
    final = os.path.join(shards, name + suffix)
    remove_path(tmp)
    try:
        for rel, size, _sha in listed_files(entry):
            src = resolve_local(src_root, rel, src_root)
            if not os.path.isfile(src):
                raise CacheError(f"shard {entry.path} listed by {src_root}: file {rel} is missing")
            inner = rel[len(entry.path) :].lstrip("/")
            dst = os.path.join(tmp, *inner.split("/")) if inner else tmp
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _place(src, dst, link)
            if os.path.getsize(dst) != size:
                raise CacheError(
                    f"{src_root}/{rel} has {os.path.getsize(dst)} bytes, its shard entry says {size}"
                )
        os.rename(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    moved = dataclasses.replace(entry, path=shard_rel_path(name, suffix), sidecar=None)
    write_bytes_atomic(
        os.path.join(shards, name + ".json"),
        (json.dumps(moved.to_json(), indent=1) + "\n").encode(),
    )


def _place(src: str, dst: str, link: bool) -> None:
    """Hard-link (or copy) the real file ``src`` to ``dst``; never creates a symlink."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(src, dst)


def _write_failures(out: str, name: str, scan: CacheScan) -> None:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    lines = "".join(json.dumps(f.to_json()) + "\n" for f in scan.failures)
    write_bytes_atomic(os.path.join(out, FAILURES_DIR, safe + ".jsonl"), lines.encode())
