"""Writing a cache from many independent workers: the folder protocol around the shards.

Protocol (docs/cache_format.md, "Writing"):

1. every worker calls :func:`init_cache` (creates ``cache_header.json`` or checks that the
   existing one matches, naming the first differing field of :mod:`.identity`'s lists);
2. each worker writes its own shards with :class:`~.shard_writer.ShardWriter`;
3. failed images go to :func:`record_failure` (``failures/<worker>.jsonl``);
4. after all workers are done, one process calls :func:`finalize` (or ``cache merge``), which
   builds the index and ``manifest.json`` from the finished shards.

A killed worker loses only the shard it was writing; :func:`completed_ids` lists what the
finished shards hold (from the shards themselves, so it is right even if a sidecar is missing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from maskteacher.cache_format.checks import file_digest
from maskteacher.cache_format.decoder_file import decoder_file_entry
from maskteacher.cache_format.errors import CacheError, CacheMismatch, os_errors
from maskteacher.cache_format.identity import header_mismatch
from maskteacher.cache_format.index import build_columns, prune_indexes, write_index
from maskteacher.cache_format.jsonio import parse_json, read_json_file, write_json_atomic
from maskteacher.cache_format.layout import ArraySpec, array_specs
from maskteacher.cache_format.locks import short_lock
from maskteacher.cache_format.manifest import Failure, Manifest, ShardEntry, ShardFile, load_header
from maskteacher.cache_format.paths import (
    FAILURES_DIR,
    HEADER_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    TMP_PREFIX,
    shard_rel_path,
    sidecar_rel_path,
)
from maskteacher.cache_format.schema import (
    DATA_DIM_ARRAYS,
    FORMAT_VERSION,
    SHARD_SUFFIX,
    CacheHeader,
)
from maskteacher.cache_format.shard_reader import ShardReader
from maskteacher.cache_format.shard_table import ShardIndex
from maskteacher.cache_format.shard_writer import NAME_RE, checksum_shard, shard_entry_of
from maskteacher.cache_format.storage import LocalSource

FINALIZE_LOCK = ".finalize.lock"


def init_cache(root: str | os.PathLike[str], header: CacheHeader) -> None:
    """Create the cache folder with ``header``, or check an existing one against it.

    Safe to call from every worker at once. A differing field raises :class:`CacheMismatch`
    naming the field and both values. Splits new to an existing cache are added to its
    fingerprints. An unwritable folder is one CacheError line.
    """
    root = os.fspath(root)
    with os_errors(f"cache folder {root}"):
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
        with short_lock(os.path.join(root, ".header.lock")):
            _join(root, header)


def _join(root: str, header: CacheHeader) -> None:
    existing = load_header(root)
    diff = header_mismatch(existing, header, layout=True)
    if diff is not None:
        hint = "use another cache folder or the original settings"
        if diff.field == "format_version" and existing.format_version < header.format_version:
            hint = f"convert it first with 'maskteacher cache upgrade {root}'"
        raise CacheMismatch(
            f"cache {root} was made with {diff.field} = {diff.have!r}, but this run has {diff.want!r}; {hint}",
            diff.field,
            diff.have,
            diff.want,
        )
    new_splits = {s: fp for s, fp in header.fingerprints.items() if s not in existing.fingerprints}
    new_roots = {s: r for s, r in header.dataset_roots.items() if s not in existing.dataset_roots}
    if new_splits or new_roots:
        updated = existing.to_json()
        updated["fingerprints"] = {**existing.fingerprints, **new_splits}
        updated["dataset_roots"] = {**existing.dataset_roots, **new_roots}
        write_json_atomic(os.path.join(root, HEADER_NAME), updated)


def new_shard_name(root: str | os.PathLike[str], worker: str) -> str:
    """``<worker>-<5-digit sequence>``, one past any shard, temp, lock or sidecar of that worker.

    Give each worker its own ``worker`` prefix (e.g. ``rank003`` or ``task0007``) so that names
    never collide between workers; a resumed worker continues its sequence.
    """
    if not NAME_RE.match(worker):
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
    if not NAME_RE.match(worker_name):
        raise CacheError(f"bad worker name {worker_name!r}: use letters, digits, '_', '-', '.'")
    line = json.dumps(
        Failure(str(image_id), str(split), " ".join(str(reason).split()), worker_name).to_json()
    )
    folder = os.path.join(os.fspath(root), FAILURES_DIR)
    with os_errors(f"failure log of {worker_name}"):
        os.makedirs(folder, exist_ok=True)
        fd = os.open(
            os.path.join(folder, worker_name + ".jsonl"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o666,
        )
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# What a cache folder holds


def finished_shards(root: str, header: CacheHeader) -> list[str]:
    """Names (without suffix) of the finished shards under ``root/shards``, sorted."""
    suffix = SHARD_SUFFIX[header.backend]
    folder = os.path.join(root, SHARDS_DIR)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith(TMP_PREFIX)]


def shard_entry(root: str, name: str, header: CacheHeader, *, repair: bool) -> ShardEntry:
    """A finished shard's entry: from its sidecar, or rebuilt from the shard itself (after a
    crash between rename and sidecar); ``repair`` writes the rebuilt sidecar."""
    suffix = SHARD_SUFFIX[header.backend]
    rel = shard_rel_path(name, suffix)
    sidecar = os.path.join(root, SHARDS_DIR, name + ".json")
    if os.path.exists(sidecar):
        entry = ShardEntry.from_json(read_json_file(sidecar, "shard sidecar"), sidecar)
        if entry.path != rel or entry.files is None:
            raise CacheError(f"{sidecar}: not the sidecar of its shard {rel!r}")
        return entry
    reader = ShardReader(
        LocalSource(root), ShardEntry(rel, "train", header.backend, 0, 0, 0, 0), header, None
    )
    try:
        idx = ShardIndex.from_json(reader.backend.read_index(), reader.source.describe(rel))
    finally:
        reader.close()
    entry = shard_entry_of(
        header, idx, rel, checksum_shard(os.path.join(root, SHARDS_DIR, name + suffix))
    )
    if repair:
        write_json_atomic(sidecar, entry.to_json())
    return entry


@dataclass
class CacheScan:
    """What a cache folder holds now: header, finished shards (full entries), failures."""

    header: CacheHeader
    shards: list[ShardEntry]
    failures: list[Failure] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)


def scan_cache(root: str | os.PathLike[str], *, repair: bool = False) -> CacheScan:
    """The header, finished shards and failures of a local cache folder; CacheError (naming
    ``cache repair``) when one image is in two shards."""
    root = os.fspath(root)
    header = load_header(root)
    shards = [
        shard_entry(root, name, header, repair=repair) for name in finished_shards(root, header)
    ]
    owner: dict[tuple[str, str], str] = {}
    for entry in shards:
        for image_id in entry.image_ids or []:
            key = (entry.split, image_id)
            if key in owner:
                raise CacheError(
                    f"image {image_id!r} ({entry.split}) is in two shards: {owner[key]} and {entry.path}; "
                    f"keep one copy with 'maskteacher cache repair {root}'"
                )
            owner[key] = entry.path
    return CacheScan(header, shards, read_failures(root, owner))


def read_failures(root: str, done: dict[tuple[str, str], str]) -> list[Failure]:
    """The failure logs' latest word per image, minus images a shard holds after all."""
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


def completed_ids(root: str | os.PathLike[str]) -> dict[str, set[str]]:
    """Image ids held by the finished shards, per split (what a resumed precompute skips)."""
    root = os.fspath(root)
    header = load_header(root)
    done: dict[str, set[str]] = {}
    for name in finished_shards(root, header):
        entry = shard_entry(root, name, header, repair=False)
        done.setdefault(entry.split, set()).update(entry.image_ids or [])
    return done


# --------------------------------------------------------------------------------------------
# Finalize: index + manifest


def finalize(root: str | os.PathLike[str], *, upgraded_from: dict | None = None) -> Manifest:
    """Build the index and ``manifest.json`` (atomically) from the finished shards; call once
    all writers are done (rank 0 after a barrier; concurrent calls are serialised). Rewrites
    missing sidecars. Returns the manifest."""
    root = os.fspath(root)
    with os_errors(f"the manifest of {root}"), short_lock(os.path.join(root, FINALIZE_LOCK)):
        scan = scan_cache(root, repair=True)
        if scan.header.format_version != FORMAT_VERSION:
            raise CacheError(
                f"cache {root} has format_version {scan.header.format_version}; convert it with 'maskteacher cache upgrade {root}'"
            )
        source = LocalSource(root)
        tables, layout = _tables_and_layout(source, scan)
        previous = _previous_index(root)
        manifest = Manifest(
            header=scan.header,
            shards=scan.shards,
            failures=scan.failures,
            layout=layout,
            index=write_index(root, build_columns(tables)),
            quant=_quant_summary(scan.shards),
            upgraded_from=upgraded_from if upgraded_from is not None else _kept_upgrade_note(root),
            decoder=decoder_file_entry(root),
        )
        for entry in manifest.shards:
            entry.sidecar = _sidecar_digest(source, entry)
        write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest.to_json())
        prune_indexes(root, {manifest.index.path, *previous})
        source.close()
    return manifest


def _tables_and_layout(
    source: LocalSource, scan: CacheScan
) -> tuple[list[ShardIndex], dict[str, ArraySpec]]:
    """Every shard's own table (metadata checked against its sidecar's sha256) and the array
    layout they share (CacheError naming a shard whose arrays differ)."""
    tables, dims = [], {}
    for entry in scan.shards:
        reader = ShardReader(source, entry, scan.header, None)
        try:
            table = reader.table()
            for name in DATA_DIM_ARRAYS:
                if (
                    name in table.dims
                    and dims.setdefault(name, table.dims[name]) != table.dims[name]
                ):
                    raise CacheError(
                        f"shard {entry.path}: {name} has {table.dims[name]} channels, other shards {dims[name]}"
                    )
            layout = array_specs(scan.header, dims) if len(table) else {}
            stored = reader.stored_specs()
            if {k: (s.chunk_rows, s.codec, s.chunks_per_file) for k, s in stored.items()} != {
                k: (s.chunk_rows, s.codec, s.chunks_per_file) for k, s in layout.items()
            }:
                raise CacheError(
                    f"shard {entry.path}: its arrays are not laid out as the cache header says"
                )
        finally:
            reader.close()
        tables.append(table)
    return tables, array_specs(scan.header, dims) if scan.shards else {}


def _sidecar_digest(source: LocalSource, entry: ShardEntry) -> ShardFile:
    """Size and sha256 of a shard's sidecar, as the format-2 manifest records them."""
    rel = sidecar_rel_path(entry.path, SHARD_SUFFIX[entry.backend])
    size, sha = file_digest(source, rel)
    return ShardFile(rel, size, sha)


def _quant_summary(shards: list[ShardEntry]) -> dict:
    clipped = [
        s.quant.get("clipped_fraction")
        for s in shards
        if s.quant.get("clipped_fraction") is not None
    ]
    errors = [
        s.quant.get("max_err_band") for s in shards if s.quant.get("max_err_band") is not None
    ]
    return {
        "clipped_fraction_max": max(clipped) if clipped else None,
        "max_err_band": max(errors) if errors else None,
        "pixels": int(np.sum([s.quant.get("pixels", 0) for s in shards])),
    }


def _manifest_json(root: str) -> dict | None:
    path = os.path.join(root, MANIFEST_NAME)
    try:
        data = read_json_file(path, "manifest")
    except CacheError:
        return None
    return data if isinstance(data, dict) else None


def _previous_index(root: str) -> set[str]:
    data = _manifest_json(root)
    index = data.get("index") if data else None
    return (
        {index["path"]} if isinstance(index, dict) and isinstance(index.get("path"), str) else set()
    )


def _kept_upgrade_note(root: str) -> dict | None:
    data = _manifest_json(root)
    note = data.get("upgraded_from") if data else None
    return note if isinstance(note, dict) else None
