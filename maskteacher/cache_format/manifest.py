"""Manifest and header files: atomic JSON I/O, safe shard paths, fingerprints, ``expect`` checks.

Files at the cache root (all JSON, nothing is ever executed or unpickled):

* ``cache_header.json`` -- :class:`~maskteacher.cache_format.schema.CacheHeader`, written by
  :func:`~maskteacher.cache_format.writer.init_cache` before any shard exists;
* ``manifest.json`` -- :class:`~maskteacher.cache_format.schema.Manifest`, built from the shard
  sidecars by ``finalize`` / ``cache merge``; the only file a reader needs to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from typing import Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.schema import CacheHeader, Manifest

MANIFEST_NAME = "manifest.json"
HEADER_NAME = "cache_header.json"
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"


def dataset_fingerprint(entries: list[tuple[str, int]]) -> str:
    """Hash of a dataset split: sha256 over the sorted ``(image_id, file size in bytes)`` pairs.

    Returns ``"sha256:<hex>"``. Order-independent; any added, removed, renamed or resized image
    changes it.
    """
    h = hashlib.sha256()
    for image_id, size in sorted((str(i), int(s)) for i, s in entries):
        h.update(json.dumps([image_id, size]).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# JSON files


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CacheError(f"{where}: not valid JSON ({exc})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def read_json_file(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CacheError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CacheError(f"cannot read {what} {path}: {exc.strerror}") from None
    return parse_json(raw, path)


def load_header(root: str) -> CacheHeader:
    path = os.path.join(root, HEADER_NAME)
    return CacheHeader.from_json(read_json_file(path, "cache header"), path)


# --------------------------------------------------------------------------------------------
# Shard paths


def check_relative_path(rel: str, where: str) -> str:
    """A manifest path must be relative, '/'-separated, and stay inside the cache root."""
    if not rel or "\\" in rel or "\x00" in rel:
        raise CacheError(f"{where}: bad path {rel!r}")
    if rel.startswith("/") or posixpath.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise CacheError(
            f"{where}: path {rel!r} is absolute; paths must be relative to the cache root"
        )
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CacheError(f"{where}: path {rel!r} must not contain '..', '.' or empty parts")
    return rel


def resolve_local(root: str, rel: str, where: str) -> str:
    """Join ``rel`` to a local cache root and refuse it if symlinks lead outside the root."""
    check_relative_path(rel, where)
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, *rel.split("/")))
    if os.path.commonpath([real_root, full]) != real_root:
        raise CacheError(f"{where}: path {rel!r} resolves outside the cache root ({full})")
    return full


def shard_rel_path(name: str, suffix: str) -> str:
    return f"{SHARDS_DIR}/{name}{suffix}"


# --------------------------------------------------------------------------------------------
# Comparing headers and checking what a caller expects


def first_difference(ours: CacheHeader, theirs: CacheHeader) -> tuple[str, Any, Any] | None:
    """The first field (in :meth:`CacheHeader.comparable` order) where the headers disagree."""
    a, b = ours.comparable(), theirs.comparable()
    for key in a:
        if key not in b:
            return key, a[key], None
        if a[key] != b[key]:
            return key, a[key], b[key]
    for key in b:
        if key not in a:
            return key, None, b[key]
    for split in sorted(set(ours.fingerprints) & set(theirs.fingerprints)):
        if ours.fingerprints[split] != theirs.fingerprints[split]:
            return f"fingerprints.{split}", ours.fingerprints[split], theirs.fingerprints[split]
    return None


#: ``expect`` keys that name header fields directly (anything else is looked up in ``params``).
_EXPECT_FIELDS = {
    "format_version": lambda h: h.format_version,
    "teacher_type": lambda h: h.teacher_type,
    "checkpoint_sha256": lambda h: h.checkpoint_sha256,
    "image_size": lambda h: h.image_size,
    "backend": lambda h: h.backend,
    "codec": lambda h: h.codec.name,
    "clip": lambda h: float(h.codec.clip),
    "store.teacher": lambda h: h.store.teacher,
    "store.gt": lambda h: h.store.gt,
    "store.embedding": lambda h: h.store.embedding,
    "store.tokens": lambda h: h.store.tokens,
}


def check_expect(manifest: Manifest, expect: dict[str, Any], where: str) -> None:
    """Refuse the cache when a named field differs from what the caller expects.

    Keys: ``format_version, teacher_type, checkpoint_sha256, image_size, backend, codec`` (name),
    ``clip``, ``store.<flag>``, ``fingerprints`` (a dict split -> fingerprint; only the listed
    splits are compared), and any other key is a generation parameter looked up in ``params``
    (``params.`` prefix optional). The error names the field and both values.
    """
    header = manifest.header
    for key, want in expect.items():
        if key == "fingerprints":
            if not isinstance(want, dict):
                raise CacheError("expect['fingerprints'] must be a dict split -> fingerprint")
            for split, fp in want.items():
                have = header.fingerprints.get(split)
                if have != fp:
                    raise CacheError(
                        f"{where}: dataset fingerprint of split {split!r} is {have!r} in the cache "
                        f"but {fp!r} was expected (the dataset changed since the cache was made)"
                    )
            continue
        if key in _EXPECT_FIELDS:
            have = _EXPECT_FIELDS[key](header)
            name = key
        else:
            pkey = key.removeprefix("params.")
            name = f"params.{pkey}"
            if pkey not in header.params:
                raise CacheError(
                    f"{where}: field {name!r} is missing from the cache but {want!r} was expected"
                )
            have = header.params[pkey]
        if not _same(have, want):
            raise CacheError(
                f"{where}: field {name!r} is {have!r} in the cache but {want!r} was expected"
            )


def _same(have: Any, want: Any) -> bool:
    if (
        isinstance(have, (int, float))
        and isinstance(want, (int, float))
        and not isinstance(have, bool)
    ):
        return float(have) == float(want)
    if isinstance(have, list) and isinstance(want, tuple):
        want = list(want)
    return have == want
