"""``manifest.json`` and the shard sidecars: the :class:`Manifest` and its parts, to and from JSON.

Format 2 (written by this code): the manifest holds the header, totals, the array layout, the
index files (names, sizes, crc32c and sha256), one small entry per shard (path, split, counts,
bytes and the sha256 of its sidecar) and the failed images. Per-image data lives in the
columnar index (:mod:`.index`); a shard's file list and image ids live in its sidecar
``shards/<name>.json`` (a :class:`ShardEntry` with ``files`` and ``image_ids``).

Format 1 (read, and converted by ``cache upgrade``): every shard entry of the manifest carried
its file list and image ids, and there was no index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from maskteacher.cache_format.decoder_file import DecoderFile
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import as_dict, free_object, get, parse_json, read_json_file
from maskteacher.cache_format.layout import ArraySpec
from maskteacher.cache_format.paths import HEADER_NAME, MANIFEST_NAME, check_relative_path
from maskteacher.cache_format.schema import BACKENDS, SPLITS, CacheHeader
from maskteacher.cache_format.storage import ByteSource


@dataclass
class ShardFile:
    """One file: path relative to its shard (``.`` for an HDF5 file), size, sha256."""

    path: str
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardFile:
        d = as_dict(data, where)
        return cls(
            get(d, "path", str, where), get(d, "bytes", int, where), get(d, "sha256", str, where)
        )


@dataclass
class ShardEntry:
    """A finished shard. The sidecar (and a format-1 manifest) holds ``files`` and
    ``image_ids``; a format-2 manifest holds ``sidecar`` (the sidecar's size and sha256)."""

    path: str
    split: str
    backend: str
    images: int
    masks: int
    gt_masks: int
    bytes: int
    quant: dict[str, Any] = field(default_factory=dict)
    files: list[ShardFile] | None = None
    image_ids: list[str] | None = None
    sidecar: ShardFile | None = None

    def to_json(self) -> dict[str, Any]:
        """The sidecar form (the whole entry of a format-1 manifest)."""
        if self.files is None or self.image_ids is None:
            raise CacheError(f"shard {self.path}: entry without its file list and image ids")
        out = self._counts()
        out.update(quant=self.quant, files=[f.to_json() for f in self.files])
        out["image_ids"] = self.image_ids
        return out

    def ref_json(self) -> dict[str, Any]:
        """The format-2 manifest form."""
        if self.sidecar is None:
            raise CacheError(f"shard {self.path}: entry without its sidecar digest")
        return {**self._counts(), "sidecar": self.sidecar.to_json()}

    def _counts(self) -> dict[str, Any]:
        keys = ("path", "split", "backend", "images", "masks", "gt_masks", "bytes")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardEntry:
        """A sidecar / format-1 entry (``files`` and ``image_ids``) or a format-2 reference."""
        d = as_dict(data, where)
        entry = cls(
            path=check_relative_path(get(d, "path", str, where), f"{where}: path"),
            split=get(d, "split", str, where),
            backend=get(d, "backend", str, where),
            images=get(d, "images", int, where),
            masks=get(d, "masks", int, where),
            gt_masks=get(d, "gt_masks", int, where),
            bytes=get(d, "bytes", int, where),
        )
        if "sidecar" in d:
            entry.sidecar = ShardFile.from_json(d["sidecar"], f"{where}: sidecar")
        else:
            entry.quant = free_object(d, "quant", where)
            entry.files = [
                ShardFile.from_json(f, f"{where}: files[{k}]")
                for k, f in enumerate(get(d, "files", list, where))
            ]
            entry.image_ids = _ids(get(d, "image_ids", list, where), entry.images, where)
        if entry.split not in SPLITS:
            raise CacheError(f"{where}: split {entry.split!r} is not one of {', '.join(SPLITS)}")
        if entry.backend not in BACKENDS:
            raise CacheError(
                f"{where}: backend {entry.backend!r} is not one of {', '.join(BACKENDS)}"
            )
        return entry


def _ids(ids: list[Any], images: int, where: str) -> list[str]:
    if any(not isinstance(i, str) for i in ids):
        raise CacheError(f"{where}: image_ids must be strings")
    if images != len(ids):
        raise CacheError(f"{where}: 'images' is {images} but {len(ids)} image ids are listed")
    return ids


@dataclass(frozen=True)
class Failure:
    """An image the teacher could not process, with the reason (kept in the manifest)."""

    image_id: str
    split: str
    reason: str
    worker: str = ""

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Failure:
        d = as_dict(data, where)
        return cls(
            image_id=get(d, "image_id", str, where),
            split=get(d, "split", str, where),
            reason=get(d, "reason", str, where),
            worker=str(d.get("worker", "")),
        )


@dataclass(frozen=True)
class IndexFile:
    """One column file of the index: size, crc32c (checked on load) and sha256 (verify)."""

    bytes: int
    crc32c: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexFile:
        d = as_dict(data, where)
        return cls(
            get(d, "bytes", int, where), get(d, "crc32c", int, where), get(d, "sha256", str, where)
        )


@dataclass(frozen=True)
class IndexInfo:
    """Where the columnar index lives (a folder relative to the root) and its column files."""

    path: str
    images: int
    columns: dict[str, IndexFile]

    def to_json(self) -> dict[str, Any]:
        cols = {k: v.to_json() for k, v in sorted(self.columns.items())}
        return {"path": self.path, "images": self.images, "columns": cols}

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexInfo:
        d = as_dict(data, where)
        cols = as_dict(get(d, "columns", dict, where), f"{where}: columns")
        return cls(
            path=check_relative_path(get(d, "path", str, where), f"{where}: path"),
            images=get(d, "images", int, where),
            columns={k: IndexFile.from_json(v, f"{where}: columns.{k}") for k, v in cols.items()},
        )


@dataclass
class Manifest:
    """``manifest.json``: header, shards and failed images; format 2 adds the array layout,
    the index and the quantisation summary (``upgraded_from``: the format-1 id, if converted);
    ``decoder``: the teacher's prompt encoder + mask decoder weights file, when the cache holds
    one (:mod:`.decoder_file`; an optional key, so readers that predate it still read the cache)."""

    header: CacheHeader
    shards: list[ShardEntry]
    failures: list[Failure] = field(default_factory=list)
    layout: dict[str, ArraySpec] | None = None
    index: IndexInfo | None = None
    quant: dict[str, Any] = field(default_factory=dict)
    upgraded_from: dict[str, Any] | None = None
    decoder: DecoderFile | None = None

    @property
    def version(self) -> int:
        return int(self.header.format_version)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        out = self.header.to_json()
        out["num_images"] = self.images
        out["num_masks"] = sum(s.masks for s in self.shards)
        if self.version == 1:
            out["shards"] = [s.to_json() for s in self.shards]
        else:
            if self.layout is None or self.index is None:
                raise CacheError("a format-2 manifest needs its layout and index")
            out["layout"] = {k: v.to_json() for k, v in self.layout.items()}
            out["index"] = self.index.to_json()
            out["quant"] = self.quant
            out["shards"] = [s.ref_json() for s in self.shards]
            if self.upgraded_from is not None:
                out["upgraded_from"] = self.upgraded_from
            if self.decoder is not None:
                out["teacher_decoder"] = self.decoder.to_json()
        out["failures"] = [f.to_json() for f in self.failures]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        header = CacheHeader.from_json(data, where)
        d = as_dict(data, where)
        shards = [
            ShardEntry.from_json(s, f"{where}: shards[{k}]")
            for k, s in enumerate(get(d, "shards", list, where))
        ]
        failures = [
            Failure.from_json(f, f"{where}: failures[{k}]")
            for k, f in enumerate(get(d, "failures", list, where))
        ]
        manifest = cls(header=header, shards=shards, failures=failures)
        kinds = {s.sidecar is None for s in shards}
        if kinds != ({True} if header.format_version == 1 else {False}) and shards:
            raise CacheError(
                f"{where}: shard entries do not match format_version {header.format_version}"
            )
        if header.format_version >= 2:
            layout = as_dict(get(d, "layout", dict, where), f"{where}: layout")
            manifest.layout = {
                k: ArraySpec.from_json(v, f"{where}: layout.{k}") for k, v in layout.items()
            }
            manifest.index = IndexInfo.from_json(get(d, "index", dict, where), f"{where}: index")
            manifest.quant = free_object(d, "quant", where)
            if "upgraded_from" in d:
                manifest.upgraded_from = free_object(d, "upgraded_from", where)
            if "teacher_decoder" in d:
                manifest.decoder = DecoderFile.from_json(
                    d["teacher_decoder"], f"{where}: teacher_decoder"
                )
        return manifest

    def cache_id(self) -> str:
        """A short stable id: sha256 of the canonical manifest JSON (format 2: kilobytes per
        thousand shards, built on the sidecar and index checksums). Format 1 keeps the id its
        trainer checkpoints recorded (the same formula over the old, large manifest)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_header(root: str) -> CacheHeader:
    """The ``cache_header.json`` of a local cache folder (CacheError if missing or malformed)."""
    path = os.path.join(root, HEADER_NAME)
    return CacheHeader.from_json(read_json_file(path, "cache header"), path)


def load_manifest(source: ByteSource) -> Manifest:
    """The manifest of the cache behind ``source``; CacheError when there is none (naming the
    command that finishes an unfinished cache) or it is malformed."""
    where = source.describe(MANIFEST_NAME)
    if not source.exists(MANIFEST_NAME):
        if source.exists(HEADER_NAME):
            raise CacheError(
                f"{source.describe()} has no {MANIFEST_NAME}: the cache is unfinished (finalize did "
                f"not run); finish it with 'maskteacher cache merge {source.describe()} {source.describe()}'"
            )
        raise CacheError(f"{source.describe()} is not a cache: no {MANIFEST_NAME}")
    return Manifest.from_json(parse_json(source.read_all(MANIFEST_NAME), where), where)


def load_sidecar(source: ByteSource, entry: ShardEntry, rel: str) -> ShardEntry:
    """The full entry of a format-2 shard from its sidecar ``rel``, checked against the size and
    sha256 the manifest records and against the manifest's counts."""
    where = source.describe(rel)
    raw = source.read_all(rel)
    want = entry.sidecar
    if want is not None and (
        len(raw) != want.bytes or hashlib.sha256(raw).hexdigest() != want.sha256
    ):
        raise CacheError(f"{where}: sidecar fails its sha256 check (contents changed)")
    full = ShardEntry.from_json(parse_json(raw, where), where)
    if full.path != entry.path or full.split != entry.split or full.images != entry.images:
        raise CacheError(f"{where}: sidecar disagrees with the manifest's entry for {entry.path}")
    full.sidecar = want
    return full
