"""``cache upgrade``: convert a format-1 cache (per-image JSON manifest) to format 2 in place.

The shards are not touched (their bytes are the same in both formats). The upgrade first checks
every shard file's sha256 (a shard corrupted in format 1 must not become an index entry), writes
any missing sidecar from the old manifest, sets ``format_version`` 2 in ``cache_header.json`` and
finalizes: the index and the new manifest are built from the shards' own tables. The manifest
records the old cache id (``upgraded_from``), so a trainer can recognise checkpoints made with
the cache before it was converted.
"""

from __future__ import annotations

import dataclasses
import json
import os

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import write_bytes_atomic, write_json_atomic
from maskteacher.cache_format.locks import live_writers
from maskteacher.cache_format.manifest import Manifest, load_header, load_manifest
from maskteacher.cache_format.paths import (
    FAILURES_DIR,
    HEADER_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    sidecar_rel_path,
)
from maskteacher.cache_format.schema import FORMAT_VERSION, SHARD_SUFFIX
from maskteacher.cache_format.storage import LocalSource
from maskteacher.cache_format.verify import verify_cache
from maskteacher.cache_format.writer import finalize


def upgrade_cache(
    root: str | os.PathLike[str], *, jobs: int | None = None, progress: bool = False
) -> tuple[Manifest, bool]:
    """Convert the local cache ``root`` to the current format; returns (manifest, whether it
    was converted: False when it already was current). CacheError when the cache is being
    written, or a shard file fails its checksum (naming the first)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise CacheError(f"cache folder not found: {root}")
    busy = live_writers(root)
    if busy:
        raise CacheError(
            f"cache {root} is being written (pid {busy[0].get('pid')} on {busy[0].get('host')}); upgrade it once that run has finished"
        )
    has_manifest = os.path.exists(os.path.join(root, MANIFEST_NAME))
    old = load_manifest(LocalSource(root)) if has_manifest else None
    header = old.header if old is not None else load_header(root)
    if header.format_version == FORMAT_VERSION:
        if old is None:
            raise CacheError(
                f"{root} is unfinished; finish it with 'maskteacher cache merge {root} {root}'"
            )
        return old, False
    upgraded_from = None
    if old is not None:
        report = verify_cache(root, progress=progress, jobs=jobs, checksums_only=True)
        if not report.ok:
            raise CacheError(
                f"{root}: {len(report.problems)} problem(s) found before upgrading, the first: {report.problems[0]}; repair or re-create the cache first"
            )
        _write_sidecars(root, old)
        upgraded_from = {"format_version": old.version, "cache_id": old.cache_id()}
    write_json_atomic(
        os.path.join(root, HEADER_NAME),
        dataclasses.replace(header, format_version=FORMAT_VERSION).to_json(),
    )
    return finalize(root, upgraded_from=upgraded_from), True


def _write_sidecars(root: str, manifest: Manifest) -> None:
    """The sidecar of every shard the format-1 manifest lists and that lacks one, and its failed
    images as a failure log (a copied cache may lack ``failures/``)."""
    os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
    if manifest.failures:
        os.makedirs(os.path.join(root, FAILURES_DIR), exist_ok=True)
        lines = "".join(json.dumps(f.to_json()) + "\n" for f in manifest.failures)
        write_bytes_atomic(
            os.path.join(root, FAILURES_DIR, "format1-manifest.jsonl"), lines.encode()
        )
    for entry in manifest.shards:
        path = os.path.join(
            root, *sidecar_rel_path(entry.path, SHARD_SUFFIX[entry.backend]).split("/")
        )
        if not os.path.exists(path):
            write_json_atomic(path, entry.to_json())
