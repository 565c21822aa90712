"""``cache verify`` and ``cache inspect``: check every byte of a cache, summarise a cache."""

from __future__ import annotations

import hashlib
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import MANIFEST_NAME, check_relative_path
from maskteacher.cache_format.reader import CacheReader, ShardReader, decode_raw, load_manifest
from maskteacher.cache_format.schema import Manifest, ShardEntry
from maskteacher.cache_format.storage import ByteSource, LocalSource, make_source


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
            "images_ok": self.images_ok,
            "problems": [
                {"where": p.where, "image_id": p.image_id, "message": p.message}
                for p in self.problems
            ],
        }


def verify_cache(path: str | os.PathLike[str], *, progress: bool = True) -> VerifyReport:
    """Recompute every file checksum and decode every image; collect all problems found.

    A cache that cannot be opened at all (no manifest, wrong format version) is reported as a
    problem of ``manifest.json`` rather than raised.
    """
    source = make_source(path)
    report = VerifyReport(path=source.describe())
    try:
        manifest = load_manifest(source)
    except CacheError as exc:
        report.problems.append(Problem(MANIFEST_NAME, None, str(exc)))
        return report
    report.shards = len(manifest.shards)
    report.images = manifest.images
    bar = _progress(manifest.images, progress, "verify")
    for k, entry in enumerate(manifest.shards):
        try:
            check_relative_path(entry.path, f"{MANIFEST_NAME}: shards[{k}].path")
            if isinstance(source, LocalSource):
                source.path(entry.path)  # refuses symlinks leading outside the cache
        except CacheError as exc:
            report.problems.append(Problem(entry.path, None, str(exc)))
            bar.update(entry.images)
            continue
        report.files += len(entry.files)
        report.problems.extend(_check_files(source, entry))
        ok, problems = _decode_shard(source, manifest, entry, bar)
        report.images_ok += ok
        report.problems.extend(problems)
    bar.close()
    return report


def _check_files(source: ByteSource, entry: ShardEntry) -> list[Problem]:
    problems = []
    listed = set()
    for f in entry.files:
        rel = entry.path if f.path == "." else f"{entry.path}/{f.path}"
        listed.add(rel)
        try:
            check_relative_path(rel, entry.path)
            size, digest = _hash(source, rel)
        except CacheError as exc:
            problems.append(Problem(entry.path, None, str(exc)))
            continue
        if size != f.bytes:
            problems.append(
                Problem(
                    entry.path, None, f"file {f.path} has {size} bytes, the manifest says {f.bytes}"
                )
            )
        elif digest != f.sha256:
            problems.append(
                Problem(
                    entry.path, None, f"file {f.path} fails its sha256 check (contents changed)"
                )
            )
    if isinstance(source, LocalSource):
        full = source.path(entry.path)
        if os.path.isdir(full):
            for folder, _dirs, names in os.walk(full):
                for name in names:
                    rel = (
                        entry.path
                        + "/"
                        + os.path.relpath(os.path.join(folder, name), full).replace(os.sep, "/")
                    )
                    if rel not in listed:
                        problems.append(
                            Problem(entry.path, None, f"file {rel} is not listed in the manifest")
                        )
    return problems


def _hash(source: ByteSource, rel: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with source.open_binary(rel) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _decode_shard(
    source: ByteSource, manifest: Manifest, entry: ShardEntry, bar: Any
) -> tuple[int, list[Problem]]:
    reader = ShardReader(source, entry, manifest.header)
    problems: list[Problem] = []
    ok = 0
    try:
        n = len(reader.index())
        reader.specs()
    except CacheError as exc:
        bar.update(entry.images)
        return 0, [Problem(entry.path, None, f"cannot read the shard: {exc}")]
    for local in range(n):
        image_id = entry.image_ids[local]
        try:
            rec = decode_raw(reader.read_raw(local))
            if rec.image_id != image_id:
                raise CacheError(f"record says image {rec.image_id!r}")
            ok += 1
        except CacheError as exc:
            problems.append(
                Problem(entry.path, image_id, _strip_prefix(str(exc), entry.path, image_id))
            )
        bar.update(1)
    reader.close()
    return ok, problems


def _strip_prefix(message: str, shard: str, image_id: str) -> str:
    prefix = f"shard {shard}: image {image_id!r}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------
# inspect


def inspect_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a cache: counts, masks per image, bytes per image, codec, teacher, parameters,
    quantisation statistics and failed images (reads the manifest and each shard's index)."""
    source = make_source(path)
    manifest = load_manifest(source)
    reader = CacheReader(source, manifest)
    h = manifest.header
    masks, gts = [], []
    for k in range(len(manifest.shards)):
        idx = reader.shard_reader(k).index()
        masks.extend(idx.teacher_count)
        gts.extend(idx.gt_count)
    reader.close()
    total_bytes = sum(s.bytes for s in manifest.shards)
    splits: dict[str, int] = {}
    for s in manifest.shards:
        splits[s.split] = splits.get(s.split, 0) + s.images
    clipped = [
        s.quant.get("clipped_fraction")
        for s in manifest.shards
        if s.quant.get("clipped_fraction") is not None
    ]
    errors = [
        s.quant.get("max_err_band")
        for s in manifest.shards
        if s.quant.get("max_err_band") is not None
    ]
    return {
        "path": source.describe(),
        "format_version": h.format_version,
        "backend": h.backend,
        "teacher": {"type": h.teacher_type, "checkpoint_sha256": h.checkpoint_sha256},
        "image_size": h.image_size,
        "params": h.params,
        "codec": h.codec.to_json(),
        "store": h.store.to_json(),
        "fingerprints": h.fingerprints,
        "dataset_roots": h.dataset_roots,
        "shards": len(manifest.shards),
        "images": manifest.images,
        "splits": splits,
        "masks_per_image": _spread(masks),
        "gt_masks_per_image": _spread(gts),
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / manifest.images if manifest.images else None,
        "quantisation": {
            "clipped_fraction_max": max(clipped) if clipped else None,
            "max_err_inside_8": max(errors) if errors else None,
        },
        "failed_images": [f.to_json() for f in manifest.failures],
    }


def _spread(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
