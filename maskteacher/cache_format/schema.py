"""The one place that states the cache's layout: every field, array, column, dtype, shape, frame.

Readers and writers of both backends take their names, shapes and rules from here; the byte
layout is explained for humans in ``docs/cache_format.md``.

Frames (DESIGN.md): the *original frame* is the image file's size (H, W); the *model input frame*
is the image resized so its longest side is ``image_size`` (``input_hw`` = (h, w) before padding),
padded bottom/right to ``image_size`` square; the *low-res frame* is ``L = image_size // 4``
square, the mask decoder's output, where teacher logits and ground truth live.

Layout of one shard (zarr v3 group ``shards/<name>.zarr`` or HDF5 file ``shards/<name>.h5``):
per-mask data lives in the *row arrays* of :data:`ARRAYS` in CSR form. Image ``i``'s teacher
masks are rows ``teacher_start[i] : teacher_start[i] + teacher_count[i]`` of the teacher arrays
and its ground truth masks are rows ``gt_start[i] : gt_start[i] + gt_count[i]`` of ``gt_masks``.
Every image starts on a chunk boundary (``*_start`` is a multiple of the array's chunk rows), so
an image is read as whole chunks that belong to it alone; the unused rows of its last chunk are
zero padding. The shard's own per-image table (:mod:`.shard_table`) is JSON inside the shard;
the cache-wide columnar index (:mod:`.index`) repeats it for fast lookups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import as_dict, free_object, get, str_map

FORMAT_NAME = "maskteacher-cache"
#: Format written by this code: 2 = columnar index + small manifest (1 = per-image JSON manifest).
FORMAT_VERSION = 2
#: Format versions this code reads (1 through an in-memory index; ``cache upgrade`` converts).
READABLE_VERSIONS = (1, 2)
#: Version of the per-shard table stored inside each shard (unchanged between formats 1 and 2).
SHARD_TABLE_VERSION = 1

#: Backend a new cache gets unless the caller says otherwise; chosen by ``bench/cache_io.py``.
DEFAULT_BACKEND = "zarr"
BACKENDS = ("zarr", "hdf5")
SHARD_SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}

#: Rows (masks) per chunk of the row arrays; measured in docs/cache_format.md ("Ragged layout").
DEFAULT_ROWS_PER_CHUNK = 32
#: zstd level for every compressed chunk; measured in docs/cache_format.md.
DEFAULT_ZSTD_LEVEL = 6
DEFAULT_CLIP = 12.0
LOGIT_CODECS = ("int8", "fp16")
#: Splits, in the order of their codes in the index's ``split`` column.
SPLITS = ("train", "val")

# Array names inside a shard.
TEACHER_LOGITS = "teacher_logits"
TEACHER_META = "teacher_meta"
TEACHER_TOKENS = "teacher_tokens"
GT_MASKS = "gt_masks"
EMBEDDING = "embedding"

#: Columns of ``teacher_meta`` (rows, 8) float32.
META_COLUMNS = ("point_x", "point_y", "iou", "stability", "box_x0", "box_y0", "box_x1", "box_y1")
#: Record field -> (first column of ``teacher_meta``, number of columns; 1 = a vector).
META_FIELDS = {
    "teacher_points": (0, 2),
    "teacher_iou": (2, 1),
    "teacher_stability": (3, 1),
    "teacher_boxes": (4, 4),
}

#: Attribute (zarr group) / dataset (HDF5) holding the shard's per-image JSON table.
INDEX_KEY = "maskteacher_index"


@dataclass(frozen=True)
class ArrayLayout:
    """One row array: its CSR row space (one row per teacher mask, GT mask, or image), the
    ``store`` flag that enables it and the record fields decoded from it."""

    name: str
    space: str
    store: str
    fields: tuple[str, ...]


#: Every row array a shard may hold, in storage order.
ARRAYS: tuple[ArrayLayout, ...] = (
    ArrayLayout(TEACHER_LOGITS, "teacher", "teacher", ("teacher_logits",)),
    ArrayLayout(TEACHER_META, "teacher", "teacher", tuple(META_FIELDS)),
    ArrayLayout(TEACHER_TOKENS, "teacher", "tokens", ("tokens",)),
    ArrayLayout(GT_MASKS, "gt", "gt", ("gt_masks",)),
    ArrayLayout(EMBEDDING, "image", "embedding", ("embedding",)),
)
ARRAY_BY_NAME = {a.name: a for a in ARRAYS}
#: Record field -> the array it is stored in.
FIELD_ARRAY = {f: a.name for a in ARRAYS for f in a.fields}
#: Arrays whose channel count C comes from the data (recorded in the shard table's ``dims``).
DATA_DIM_ARRAYS = (TEACHER_TOKENS, EMBEDDING)


def row_format(header: CacheHeader, name: str, dim: int | None) -> tuple[str, tuple[int, ...], int]:
    """``(dtype, row shape, rows per chunk)`` of array ``name`` in a cache made with ``header``;
    ``dim`` is the channel count C of tokens / embeddings (None for the other arrays)."""
    low, rows = header.low_res, int(header.rows_per_chunk)
    if name == TEACHER_LOGITS:
        return header.codec.stored_dtype.str, (low, low), rows
    if name == TEACHER_META:
        return "<f4", (len(META_COLUMNS),), rows
    if name == GT_MASKS:
        return "|u1", ((low * low + 7) // 8,), rows
    if dim is None:
        raise CacheError(f"store.{ARRAY_BY_NAME[name].store} is set but the record has no {name}")
    if name == TEACHER_TOKENS:
        return "<f2", (int(dim),), rows
    return "<f2", (int(dim), header.embed_size, header.embed_size), 1


def pack_meta(values: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The ``teacher_meta`` rows (n, 8) float32 from the four record fields of :data:`META_FIELDS`
    (shapes (n, 2), (n,), (n,), (n, 4)); CacheError if a shape is wrong or a value not finite."""
    meta = np.empty((n, len(META_COLUMNS)), np.float32)
    for name, (first, width) in META_FIELDS.items():
        value = np.asarray(values[name], np.float32)
        want = (n, width) if width > 1 else (n,)
        if value.shape != want:
            raise CacheError(f"{name} has shape {value.shape}, expected {want}")
        meta[:, first : first + width] = value.reshape(n, width)
    if not np.isfinite(meta).all():
        raise CacheError("teacher points/iou/stability/boxes contain NaN or infinity")
    return meta


def unpack_meta(meta: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_meta`: (n, 8) -> the four record fields (contiguous float32)."""
    return {
        name: np.ascontiguousarray(meta[:, first] if width == 1 else meta[:, first : first + width])
        for name, (first, width) in META_FIELDS.items()
    }


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
    FieldSpec("image_id", "str", "-", "-", "index column 'image_id'"),
    FieldSpec("split", "str", "-", "-", "index column 'split' ('train' | 'val')"),
    FieldSpec("orig_hw", "int64", "(2,) (H, W)", "original", "index column 'orig_hw'"),
    FieldSpec("input_hw", "int64", "(2,) (h, w)", "model input, unpadded", "index 'input_hw'"),
    FieldSpec("teacher_logits", "int8 codes | float16", "(N, L, L)", "low-res", TEACHER_LOGITS),
    FieldSpec("teacher_points", "float32", "(N, 2) (x, y)", "model input", "teacher_meta[:, 0:2]"),
    FieldSpec("teacher_iou", "float32", "(N,)", "-", "teacher_meta[:, 2]"),
    FieldSpec("teacher_stability", "float32", "(N,)", "-", "teacher_meta[:, 3]"),
    FieldSpec("teacher_boxes", "float32", "(N, 4) XYXY", "original", "teacher_meta[:, 4:8]"),
    FieldSpec("gt_masks", "bool", "(M, L, L)", "low-res", f"{GT_MASKS}, np.packbits rows"),
    FieldSpec("embedding", "float16 | None", "(C, E, E)", "encoder grid", f"{EMBEDDING}[i]"),
    FieldSpec("tokens", "float16 | None", "(N, C)", "-", f"{TEACHER_TOKENS}, decoder tokens"),
    FieldSpec("source", "str | None", "-", "-", "index column 'source' (dataset_roots[split])"),
)


@dataclass
class CacheRecord:
    """Everything the cache holds for one image (shapes documented in :data:`FIELDS`).

    ``teacher_logits`` is float32 when handed to a writer (it encodes), or already in the
    stored dtype (int8 codes / float16) when read back; :func:`logits_to_float` converts.
    A record read with ``fields=`` holds None in the fields that were not fetched.
    """

    image_id: str
    split: str
    orig_hw: np.ndarray
    input_hw: np.ndarray
    teacher_logits: np.ndarray | None
    teacher_points: np.ndarray | None
    teacher_iou: np.ndarray | None
    teacher_stability: np.ndarray | None
    teacher_boxes: np.ndarray | None
    gt_masks: np.ndarray | None
    embedding: np.ndarray | None = None
    tokens: np.ndarray | None = None
    source: str | None = None

    @property
    def num_masks(self) -> int:
        """N, from the first teacher field that was read (0 when none was)."""
        for name in ("teacher_logits", "teacher_iou", "tokens"):
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        return 0

    @property
    def num_gt(self) -> int:
        return 0 if self.gt_masks is None else int(self.gt_masks.shape[0])


def empty_teacher(low_res: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Teacher fields with N = 0 (for GT-only records), as keyword arguments of CacheRecord."""
    meta = unpack_meta(np.zeros((0, len(META_COLUMNS)), np.float32))
    return {"teacher_logits": np.zeros((0, low_res, low_res), dtype), **meta}


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
        d = as_dict(data, where)
        return cls(
            name=get(d, "name", str, where),
            clip=float(get(d, "clip", (int, float), where)),
            zstd_level=int(get(d, "zstd_level", int, where)),
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
        d = as_dict(data, where)
        return cls(**{f.name: get(d, f.name, bool, where) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class CacheHeader:
    """The generation settings every shard of a cache shares (``cache_header.json``).

    ``params`` is a JSON object written by precompute (grid, thresholds, ...; the keys that must
    match are :data:`maskteacher.cache_format.identity.GENERATION_KEYS`); ``fingerprints`` maps
    split -> dataset fingerprint; ``dataset_roots`` maps split -> the dataset folder that
    per-image ``source`` paths are relative to (informational, never compared).
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
        d = as_dict(data, where)
        if d.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{where}: not a {FORMAT_NAME} document (format = {d.get('format')!r})"
            )
        version = get(d, "format_version", int, where)
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"{where}: format_version is {version} but this reader reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        teacher = as_dict(get(d, "teacher", dict, where), f"{where}: teacher")
        return cls(
            teacher_type=get(teacher, "type", str, f"{where}: teacher"),
            checkpoint_sha256=get(teacher, "checkpoint_sha256", str, f"{where}: teacher"),
            image_size=get(d, "image_size", int, where),
            params=free_object(d, "params", where),
            codec=Codec.from_json(get(d, "codec", dict, where), f"{where}: codec"),
            store=StoreFlags.from_json(get(d, "store", dict, where), f"{where}: store"),
            backend=get(d, "backend", str, where),
            rows_per_chunk=get(d, "rows_per_chunk", int, where),
            fingerprints=str_map(get(d, "fingerprints", dict, where), f"{where}: fingerprints"),
            dataset_roots=str_map(get(d, "dataset_roots", dict, where), f"{where}: dataset_roots"),
            format_version=version,
        )
