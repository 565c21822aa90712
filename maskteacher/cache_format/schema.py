"""The one place that states the cache's on-disk layout: every field, dtype, shape, frame and codec.

Readers and writers of both backends take their names, shapes and rules from here; the byte
layout is explained for humans in ``docs/cache_format.md``.

Frames (DESIGN.md): the *original frame* is the image file's size (H, W); the *model input frame*
is the image resized so its longest side is ``image_size`` (``input_hw`` = (h, w) before padding),
padded bottom/right to ``image_size`` square; the *low-res frame* is ``L = image_size // 4``
square, the mask decoder's output, where teacher logits and ground truth live.

Layout of one shard (zarr v3 group ``shards/<name>.zarr`` or HDF5 file ``shards/<name>.h5``):
per-mask data lives in *row arrays* in CSR form. Image ``i``'s teacher masks are rows
``teacher_start[i] : teacher_start[i] + teacher_count[i]`` of the teacher arrays and its ground
truth masks are rows ``gt_start[i] : gt_start[i] + gt_count[i]`` of ``gt_masks``. Every image
starts on a chunk boundary (``*_start`` is a multiple of the array's ``rows_per_chunk``), so an
image is read as whole chunks that belong to it alone; the unused rows of its last chunk are
zero padding, which zstd stores in a few bytes. The per-image table (ids, sizes, starts, counts)
is JSON inside the shard (zarr group attribute / HDF5 ``index_json`` dataset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskteacher.cache_format.errors import CacheError

FORMAT_NAME = "maskteacher-cache"
FORMAT_VERSION = 1

#: Backend a new cache gets unless the caller says otherwise; chosen by ``bench/cache_io.py``
#: (see docs/cache_format.md, "Choosing the default backend").
DEFAULT_BACKEND = "zarr"
BACKENDS = ("zarr", "hdf5")
SHARD_SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}

#: Rows (masks) per chunk of the row arrays; measured in docs/cache_format.md ("Ragged layout").
DEFAULT_ROWS_PER_CHUNK = 32
#: zstd level for every compressed chunk; measured in docs/cache_format.md ("Compression").
DEFAULT_ZSTD_LEVEL = 6
DEFAULT_CLIP = 12.0
LOGIT_CODECS = ("int8", "fp16")
SPLITS = ("train", "val")

# Array names inside a shard.
TEACHER_LOGITS = "teacher_logits"
TEACHER_META = "teacher_meta"
TEACHER_TOKENS = "teacher_tokens"
GT_MASKS = "gt_masks"
EMBEDDING = "embedding"

#: Columns of ``teacher_meta`` (rows, 8) float32.
META_COLUMNS = ("point_x", "point_y", "iou", "stability", "box_x0", "box_y0", "box_x1", "box_y1")

#: Attribute (zarr group) / dataset (HDF5) holding the shard's per-image JSON table.
INDEX_KEY = "maskteacher_index"


@dataclass(frozen=True)
class FieldSpec:
    """One field of a :class:`CacheRecord`: where it is stored and what it means."""

    name: str
    dtype: str
    shape: str
    frame: str
    storage: str


#: Every field a reader returns, for documentation and for the writer's checks.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("image_id", "str", "-", "-", "index JSON 'image_id'"),
    FieldSpec("split", "str", "-", "-", "shard entry 'split' ('train' | 'val')"),
    FieldSpec("orig_hw", "int64", "(2,) (H, W)", "original", "index JSON 'orig_hw'"),
    FieldSpec(
        "input_hw", "int64", "(2,) (h, w)", "model input, before padding", "index JSON 'input_hw'"
    ),
    FieldSpec(
        "teacher_logits", "int8 codes | float16", "(N, L, L)", "low-res", f"{TEACHER_LOGITS}, zstd"
    ),
    FieldSpec(
        "teacher_points", "float32", "(N, 2) (x, y)", "model input", f"{TEACHER_META}[:, 0:2]"
    ),
    FieldSpec("teacher_iou", "float32", "(N,)", "-", f"{TEACHER_META}[:, 2]"),
    FieldSpec("teacher_stability", "float32", "(N,)", "-", f"{TEACHER_META}[:, 3]"),
    FieldSpec("teacher_boxes", "float32", "(N, 4) XYXY", "original", f"{TEACHER_META}[:, 4:8]"),
    FieldSpec("gt_masks", "bool", "(M, L, L)", "low-res", f"{GT_MASKS}, np.packbits rows, zstd"),
    FieldSpec(
        "embedding",
        "float16 | None",
        "(C, E, E), E = image_size // 16",
        "encoder grid",
        f"{EMBEDDING}[i]",
    ),
    FieldSpec(
        "tokens", "float16 | None", "(N, C)", "-", f"{TEACHER_TOKENS}, per-mask decoder token"
    ),
    FieldSpec(
        "source", "str | None", "-", "-", "index JSON 'source', relative to dataset_roots[split]"
    ),
)


@dataclass
class CacheRecord:
    """Everything the cache holds for one image (shapes documented in :data:`FIELDS`).

    ``teacher_logits`` is float32 when handed to a writer (it encodes), or already in the
    stored dtype (int8 codes / float16) when read back; :func:`logits_to_float` converts.
    """

    image_id: str
    split: str
    orig_hw: np.ndarray
    input_hw: np.ndarray
    teacher_logits: np.ndarray
    teacher_points: np.ndarray
    teacher_iou: np.ndarray
    teacher_stability: np.ndarray
    teacher_boxes: np.ndarray
    gt_masks: np.ndarray
    embedding: np.ndarray | None = None
    tokens: np.ndarray | None = None
    source: str | None = None

    @property
    def num_masks(self) -> int:
        return int(self.teacher_logits.shape[0])

    @property
    def num_gt(self) -> int:
        return int(self.gt_masks.shape[0])


def empty_teacher(low_res: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Teacher fields with N = 0 (for GT-only records), as keyword arguments of CacheRecord."""
    return {
        "teacher_logits": np.zeros((0, low_res, low_res), dtype),
        "teacher_points": np.zeros((0, 2), np.float32),
        "teacher_iou": np.zeros((0,), np.float32),
        "teacher_stability": np.zeros((0,), np.float32),
        "teacher_boxes": np.zeros((0, 4), np.float32),
    }


# --------------------------------------------------------------------------------------------
# Header: what every shard of one cache shares. JSON via to_json / from_json.


@dataclass(frozen=True)
class Codec:
    """How teacher logits are stored. ``int8``: code = round(clip(x, -clip, clip) * 127 / clip),
    x ~= code * scale with scale = clip / 127. ``fp16``: x.astype(float16), scale = 1."""

    name: str = "int8"
    clip: float = DEFAULT_CLIP
    zstd_level: int = DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        if self.name not in LOGIT_CODECS:
            raise CacheError(f"codec name {self.name!r} is not one of {', '.join(LOGIT_CODECS)}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise CacheError(f"codec clip must be a positive number, got {self.clip!r}")
        if not 1 <= int(self.zstd_level) <= 22:
            raise CacheError(f"codec zstd_level must be 1..22, got {self.zstd_level!r}")

    @property
    def scale(self) -> float:
        """Float logit per stored unit: ``logit = scale * stored`` (1.0 for fp16)."""
        return float(self.clip) / 127.0 if self.name == "int8" else 1.0

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(np.int8) if self.name == "int8" else np.dtype(np.float16)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "clip": float(self.clip), "zstd_level": int(self.zstd_level)}

    @classmethod
    def from_json(cls, data: Any, where: str = "codec") -> Codec:
        d = _as_dict(data, where)
        return cls(
            name=_get(d, "name", str, where),
            clip=float(_get(d, "clip", (int, float), where)),
            zstd_level=int(_get(d, "zstd_level", int, where)),
        )


@dataclass(frozen=True)
class StoreFlags:
    """Which optional parts the cache holds (``teacher`` false: a ground-truth-only cache)."""

    teacher: bool = True
    gt: bool = True
    embedding: bool = False
    tokens: bool = False

    def __post_init__(self) -> None:
        if self.tokens and not self.teacher:
            raise CacheError("store.tokens needs store.teacher (tokens are per teacher mask)")

    def to_json(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "store") -> StoreFlags:
        d = _as_dict(data, where)
        return cls(**{f.name: _get(d, f.name, bool, where) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class CacheHeader:
    """The generation settings every shard of a cache shares (``cache_header.json``).

    ``params`` is a free-form JSON object written by precompute (grid, thresholds, ...);
    ``fingerprints`` maps split -> :func:`dataset_fingerprint`; ``dataset_roots`` maps split ->
    the dataset folder that per-image ``source`` paths are relative to (informational: it is
    not compared when a second writer joins, since the same data may live elsewhere).
    """

    teacher_type: str
    checkpoint_sha256: str
    image_size: int
    params: dict[str, Any] = field(default_factory=dict)
    codec: Codec = field(default_factory=Codec)
    store: StoreFlags = field(default_factory=StoreFlags)
    backend: str = DEFAULT_BACKEND
    fingerprints: dict[str, str] = field(default_factory=dict)
    dataset_roots: dict[str, str] = field(default_factory=dict)
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CacheError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if int(self.image_size) <= 0 or int(self.image_size) % 16:
            raise CacheError(
                f"image_size must be a positive multiple of 16, got {self.image_size!r}"
            )
        if int(self.rows_per_chunk) < 1:
            raise CacheError(f"rows_per_chunk must be >= 1, got {self.rows_per_chunk!r}")
        for split in (*self.fingerprints, *self.dataset_roots):
            if split not in SPLITS:
                raise CacheError(f"split {split!r} is not one of {', '.join(SPLITS)}")

    @property
    def low_res(self) -> int:
        """L: side of the low-res frame (image_size // 4)."""
        return int(self.image_size) // 4

    @property
    def embed_size(self) -> int:
        """E: side of the image-embedding grid (image_size // 16)."""
        return int(self.image_size) // 16

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": int(self.format_version),
            "teacher": {"type": self.teacher_type, "checkpoint_sha256": self.checkpoint_sha256},
            "image_size": int(self.image_size),
            "params": self.params,
            "codec": self.codec.to_json(),
            "store": self.store.to_json(),
            "backend": self.backend,
            "rows_per_chunk": int(self.rows_per_chunk),
            "fingerprints": dict(sorted(self.fingerprints.items())),
            "dataset_roots": dict(sorted(self.dataset_roots.items())),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> CacheHeader:
        d = _as_dict(data, where)
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise CacheError(f"{where}: not a {FORMAT_NAME} document (format = {fmt!r})")
        version = _get(d, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{where}: format_version is {version} but this reader reads version {FORMAT_VERSION}"
            )
        teacher = _as_dict(_get(d, "teacher", dict, where), f"{where}: teacher")
        return cls(
            teacher_type=_get(teacher, "type", str, f"{where}: teacher"),
            checkpoint_sha256=_get(teacher, "checkpoint_sha256", str, f"{where}: teacher"),
            image_size=_get(d, "image_size", int, where),
            params=_get(d, "params", dict, where),
            codec=Codec.from_json(_get(d, "codec", dict, where), f"{where}: codec"),
            store=StoreFlags.from_json(_get(d, "store", dict, where), f"{where}: store"),
            backend=_get(d, "backend", str, where),
            rows_per_chunk=_get(d, "rows_per_chunk", int, where),
            fingerprints=_str_map(_get(d, "fingerprints", dict, where), f"{where}: fingerprints"),
            dataset_roots=_str_map(
                _get(d, "dataset_roots", dict, where), f"{where}: dataset_roots"
            ),
            format_version=version,
        )

    def comparable(self) -> dict[str, Any]:
        """Flat view of the fields that must agree between writers / merged caches."""
        flat: dict[str, Any] = {
            "format_version": self.format_version,
            "teacher_type": self.teacher_type,
            "checkpoint_sha256": self.checkpoint_sha256,
            "image_size": self.image_size,
            "codec.name": self.codec.name,
            "codec.clip": float(self.codec.clip),
            "codec.zstd_level": self.codec.zstd_level,
            "backend": self.backend,
            "rows_per_chunk": self.rows_per_chunk,
        }
        flat.update({f"store.{k}": v for k, v in self.store.to_json().items()})
        keys = sorted(self.params)
        flat["params (keys)"] = keys
        flat.update({f"params.{k}": self.params[k] for k in keys})
        return flat


# --------------------------------------------------------------------------------------------
# Shard index (inside each shard) and manifest entries.


@dataclass
class ShardIndex:
    """Per-image table of one shard, stored as JSON inside the shard itself.

    Column lists of equal length (one entry per image, in write order); ``teacher_start`` /
    ``gt_start`` are row offsets into the row arrays (multiples of ``rows_per_chunk``).
    ``dims`` gives the channel count C of ``teacher_tokens`` / ``embedding`` when stored;
    ``quant`` holds the logit-codec statistics (``codecs.merge_quant_stats``).
    """

    split: str
    image_id: list[str] = field(default_factory=list)
    source: list[str | None] = field(default_factory=list)
    orig_hw: list[list[int]] = field(default_factory=list)
    input_hw: list[list[int]] = field(default_factory=list)
    teacher_start: list[int] = field(default_factory=list)
    teacher_count: list[int] = field(default_factory=list)
    gt_start: list[int] = field(default_factory=list)
    gt_count: list[int] = field(default_factory=list)
    teacher_rows: int = 0
    gt_rows: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    quant: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    _COLUMNS = (
        "image_id",
        "source",
        "orig_hw",
        "input_hw",
        "teacher_start",
        "teacher_count",
        "gt_start",
        "gt_count",
    )

    def __len__(self) -> int:
        return len(self.image_id)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": self.format_version, "split": self.split}
        out.update({c: getattr(self, c) for c in self._COLUMNS})
        out.update(
            teacher_rows=self.teacher_rows, gt_rows=self.gt_rows, dims=self.dims, quant=self.quant
        )
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardIndex:
        d = _as_dict(data, where)
        version = _get(d, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{where}: shard format_version is {version}, this reader reads {FORMAT_VERSION}"
            )
        idx = cls(
            split=_get(d, "split", str, where),
            teacher_rows=_get(d, "teacher_rows", int, where),
            gt_rows=_get(d, "gt_rows", int, where),
            dims=_get(d, "dims", dict, where),
            quant=_get(d, "quant", dict, where),
        )
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in idx.dims.values()):
            raise CacheError(f"{where}: index 'dims' must map array names to positive ints")
        n = None
        for col in cls._COLUMNS:
            values = _get(d, col, list, where)
            if n is None:
                n = len(values)
            elif len(values) != n:
                raise CacheError(
                    f"{where}: index column {col!r} has {len(values)} entries, expected {n}"
                )
            setattr(idx, col, values)
        idx._check(where)
        return idx

    def _check(self, where: str) -> None:
        try:
            for name in ("teacher_start", "teacher_count", "gt_start", "gt_count"):
                arr = np.asarray(getattr(self, name), dtype=np.int64)
                if arr.size and arr.min() < 0:
                    raise ValueError(f"negative entry in {name}")
            for name, rows in (("teacher", self.teacher_rows), ("gt", self.gt_rows)):
                start = np.asarray(getattr(self, f"{name}_start"), dtype=np.int64)
                count = np.asarray(getattr(self, f"{name}_count"), dtype=np.int64)
                if start.size and int((start + count).max()) > rows:
                    raise ValueError(f"{name} rows run past the array end ({rows} rows)")
            for hw in (*self.orig_hw, *self.input_hw):
                if len(hw) != 2 or any(not isinstance(v, int) or v <= 0 for v in hw):
                    raise ValueError(f"bad image size {hw!r}")
            if any(not isinstance(i, str) for i in self.image_id):
                raise ValueError("image ids must be strings")
            if any(s is not None and not isinstance(s, str) for s in self.source):
                raise ValueError("sources must be strings or null")
        except (TypeError, ValueError) as exc:
            raise CacheError(f"{where}: malformed shard index: {exc}") from None
        if len(set(self.image_id)) != len(self.image_id):
            raise CacheError(f"{where}: shard index lists an image id twice")


@dataclass
class ShardFile:
    """One file of a shard: path relative to the shard (``.`` for an HDF5 file), size, sha256."""

    path: str
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardFile:
        d = _as_dict(data, where)
        return cls(
            _get(d, "path", str, where), _get(d, "bytes", int, where), _get(d, "sha256", str, where)
        )


@dataclass
class ShardEntry:
    """A finished shard as listed in the manifest (and in its sidecar ``<shard>.json``)."""

    path: str
    split: str
    backend: str
    image_ids: list[str]
    images: int
    masks: int
    gt_masks: int
    bytes: int
    files: list[ShardFile]
    quant: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "split": self.split,
            "backend": self.backend,
            "images": self.images,
            "masks": self.masks,
            "gt_masks": self.gt_masks,
            "bytes": self.bytes,
            "quant": self.quant,
            "files": [f.to_json() for f in self.files],
            "image_ids": self.image_ids,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardEntry:
        d = _as_dict(data, where)
        ids = _get(d, "image_ids", list, where)
        if any(not isinstance(i, str) for i in ids):
            raise CacheError(f"{where}: image_ids must be strings")
        entry = cls(
            path=_get(d, "path", str, where),
            split=_get(d, "split", str, where),
            backend=_get(d, "backend", str, where),
            image_ids=ids,
            images=_get(d, "images", int, where),
            masks=_get(d, "masks", int, where),
            gt_masks=_get(d, "gt_masks", int, where),
            bytes=_get(d, "bytes", int, where),
            files=[
                ShardFile.from_json(f, f"{where}: files[{k}]")
                for k, f in enumerate(_get(d, "files", list, where))
            ],
            quant=_get(d, "quant", dict, where),
        )
        if entry.images != len(ids):
            raise CacheError(
                f"{where}: 'images' is {entry.images} but {len(ids)} image ids are listed"
            )
        if entry.split not in SPLITS:
            raise CacheError(f"{where}: split {entry.split!r} is not one of {', '.join(SPLITS)}")
        if entry.backend not in BACKENDS:
            raise CacheError(
                f"{where}: backend {entry.backend!r} is not one of {', '.join(BACKENDS)}"
            )
        return entry


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
        d = _as_dict(data, where)
        return cls(
            image_id=_get(d, "image_id", str, where),
            split=_get(d, "split", str, where),
            reason=_get(d, "reason", str, where),
            worker=str(d.get("worker", "")),
        )


@dataclass
class Manifest:
    """``manifest.json``: the header plus the finished shards and the failed images."""

    header: CacheHeader
    shards: list[ShardEntry]
    failures: list[Failure] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        out = self.header.to_json()
        out["num_images"] = self.images
        out["num_masks"] = sum(s.masks for s in self.shards)
        out["shards"] = [s.to_json() for s in self.shards]
        out["failures"] = [f.to_json() for f in self.failures]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest.json") -> Manifest:
        header = CacheHeader.from_json(data, where)
        d = _as_dict(data, where)
        shards = [
            ShardEntry.from_json(s, f"{where}: shards[{k}]")
            for k, s in enumerate(_get(d, "shards", list, where))
        ]
        failures = [
            Failure.from_json(f, f"{where}: failures[{k}]")
            for k, f in enumerate(_get(d, "failures", list, where))
        ]
        return cls(header=header, shards=shards, failures=failures)


# --------------------------------------------------------------------------------------------
# Small JSON validation helpers (a manifest may come from someone else: check every type).


def _as_dict(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CacheError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CacheError(f"{where}: missing field {key!r}")
    value = d[key]
    bad_bool = (
        isinstance(value, bool)
        and typ is not bool
        and bool not in (typ if isinstance(typ, tuple) else (typ,))
    )
    if not isinstance(value, typ) or bad_bool:
        want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise CacheError(f"{where}: field {key!r} must be {want}, got {value!r}")
    return value


def _str_map(d: dict[str, Any], where: str) -> dict[str, str]:
    if any(not isinstance(v, str) for v in d.values()):
        raise CacheError(f"{where}: values must be strings")
    return dict(d)
