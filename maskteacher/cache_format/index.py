"""The cache-wide columnar index: per-image metadata as flat numpy arrays, one ``.npy`` file each.

``index/<token>/<column>.npy`` (plain numpy ``.npy``, read with ``allow_pickle=False``
semantics: numeric dtypes only). Image ``p`` (its position in the cache, shards in manifest order,
images in write order) has:

=====================  =======  ===================================================
column                 dtype    meaning
=====================  =======  ===================================================
``image_id.bytes``     u1       UTF-8 ids concatenated; id p is ``bytes[off[p]:off[p+1]]``
``image_id.offsets``   <i8      (N + 1,) offsets into ``image_id.bytes``
``split``              u1       index into ``schema.SPLITS`` (0 train, 1 val)
``shard``              <i4      position of its shard in the manifest's ``shards``
``local``              <i4      its position inside the shard (embedding row)
``teacher_start``      <i4      first teacher row (chunk-aligned), ``teacher_count`` <i4
``gt_start``           <i4      first ground-truth row (chunk-aligned), ``gt_count`` <i4
``orig_hw``            <i4      (N, 2) original (H, W); ``input_hw`` (N, 2) unpadded (h, w)
``source.bytes`` /     u1 /     image path relative to ``dataset_roots[split]`` (UTF-8);
``source.offsets``     <i8      a single NUL byte means "no source"
``lookup.hash``        <u8      blake2b-64 of each id, sorted; ``lookup.order`` (<i4 / <i8):
                                the positions in that order (binary search by id)
=====================  =======  ===================================================

The manifest lists every column file with its size, crc32c and sha256. A reader maps a column
(``mmap``: pages are shared between DataLoader workers and never copied) the first time it needs
it and checks its crc32c then (~10 ms per 100 MB), so a flipped byte is an error, never a wrong
row; ``cache verify`` checks the sha256. Format-1 caches get the same columns built in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import google_crc32c
import numpy as np

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import IndexFile, IndexInfo
from maskteacher.cache_format.paths import INDEX_DIR, TMP_PREFIX
from maskteacher.cache_format.schema import SPLITS
from maskteacher.cache_format.shard_table import ShardIndex
from maskteacher.cache_format.storage import ByteSource

#: Column name -> allowed dtypes (the first is what the builder writes).
COLUMNS = {
    "image_id.bytes": ("|u1",),
    "image_id.offsets": ("<i8",),
    "split": ("|u1",),
    "shard": ("<i4",),
    "local": ("<i4",),
    "teacher_start": ("<i4",),
    "teacher_count": ("<i4",),
    "gt_start": ("<i4",),
    "gt_count": ("<i4",),
    "orig_hw": ("<i4",),
    "input_hw": ("<i4",),
    "source.bytes": ("|u1",),
    "source.offsets": ("<i8",),
    "lookup.hash": ("<u8",),
    "lookup.order": ("<i4", "<i8"),
}
NO_SOURCE = b"\x00"


def id_hash(image_id: str) -> int:
    """The 64-bit lookup hash of an id (blake2b, little-endian)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little")


class CacheIndex:
    """The index columns of one cache: mapped from files (format 2) or held in memory."""

    def __init__(
        self,
        source: ByteSource | None,
        info: IndexInfo | None,
        columns: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.source = source
        self.info = info
        self._memory = columns is not None
        self._cols: dict[str, np.ndarray] = dict(columns or {})
        self.size = info.images if info is not None else len(self._cols["split"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if not self._memory:
            state["_cols"] = {}  # remapped in the receiving process
        return state

    def __len__(self) -> int:
        return self.size

    def col(self, name: str) -> np.ndarray:
        """Column ``name`` (mapped and crc-checked on first use)."""
        arr = self._cols.get(name)
        if arr is None:
            arr = self._cols[name] = self._load(name)
        return arr

    def _load(self, name: str) -> np.ndarray:
        if self.info is None or self.source is None or name not in self.info.columns:
            raise CacheError(f"the cache index has no column {name!r}")
        rel = f"{self.info.path}/{name}.npy"
        where = self.source.describe(rel)
        want = self.info.columns[name]
        buf = np.frombuffer(self.source.buffer(rel), np.uint8)
        if buf.size != want.bytes or google_crc32c.value(buf) != want.crc32c:
            raise CacheError(f"{where}: index column fails its crc32c check (contents changed)")
        arr = npy_array(buf, where)
        if arr.dtype.str not in COLUMNS.get(name, ()):
            raise CacheError(f"{where}: dtype {arr.dtype.str} is not one of {COLUMNS.get(name)}")
        rows = self.size + 1 if name.endswith(".offsets") else self.size
        if not name.endswith(".bytes") and arr.shape[0] != rows:
            raise CacheError(f"{where}: {arr.shape[0]} rows, expected {rows}")
        return arr

    # -- strings -------------------------------------------------------------------------------

    def text(self, column: str, p: int) -> str:
        off = self.col(f"{column}.offsets")
        raw = self.col(f"{column}.bytes")[int(off[p]) : int(off[p + 1])].tobytes()
        return raw.decode("utf-8")

    def image_id(self, p: int) -> str:
        return self.text("image_id", p)

    def source_of(self, p: int) -> str | None:
        off = self.col("source.offsets")
        raw = self.col("source.bytes")[int(off[p]) : int(off[p + 1])].tobytes()
        return None if raw == NO_SOURCE else raw.decode("utf-8")

    def find(self, image_id: str) -> list[int]:
        """Positions holding ``image_id`` (one per split at most), in position order."""
        hashes = self.col("lookup.hash")
        h = np.uint64(id_hash(image_id))
        lo, hi = np.searchsorted(hashes, h, "left"), np.searchsorted(hashes, h, "right")
        order = self.col("lookup.order")
        return sorted(int(p) for p in order[lo:hi] if self.image_id(int(p)) == image_id)

    def duplicates(self) -> list[tuple[str, str, list[int]]]:
        """(split, image id, positions) of every id listed more than once in one split."""
        hashes = self.col("lookup.hash")
        same = np.flatnonzero(hashes[1:] == hashes[:-1])
        order, splits = self.col("lookup.order"), self.col("split")
        groups: dict[tuple[str, str], list[int]] = {}
        for k in np.unique(np.concatenate([same, same + 1])) if same.size else []:
            p = int(order[k])
            groups.setdefault((SPLITS[int(splits[p])], self.image_id(p)), []).append(p)
        return [(s, i, sorted(ps)) for (s, i), ps in sorted(groups.items()) if len(ps) > 1]


def npy_array(buf: np.ndarray, where: str) -> np.ndarray:
    """The array of a ``.npy`` file held in ``buf`` (uint8), without copying; numeric only."""
    head = io.BytesIO(buf[: min(buf.size, 1 << 16)].tobytes())
    try:
        major, _minor = np.lib.format.read_magic(head)
        reader = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(head)
    except ValueError as exc:
        raise CacheError(f"{where}: not a .npy file ({exc})") from None
    if fortran or dtype.hasobject or dtype.kind not in "biuf":
        raise CacheError(f"{where}: unsupported .npy array ({dtype}, fortran={fortran})")
    count = int(np.prod(shape, dtype=np.int64))
    if head.tell() + count * dtype.itemsize != buf.size:
        raise CacheError(f"{where}: file size does not match its .npy header")
    return np.frombuffer(buf, dtype, count=count, offset=head.tell()).reshape(shape)


class IdView(Sequence):
    """The image ids of a reader as a read-only sequence of str, decoded on access."""

    def __init__(self, index: CacheIndex, positions: np.ndarray | None) -> None:
        self._index, self._positions = index, positions

    def __len__(self) -> int:
        return len(self._index) if self._positions is None else int(self._positions.size)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        k = int(i)
        if not -n <= k < n:
            raise IndexError(f"index {k} out of range for {n} ids")
        k %= n
        return self._index.image_id(k if self._positions is None else int(self._positions[k]))

    def __iter__(self) -> Iterator[str]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"IdView({len(self)} ids)"


# --------------------------------------------------------------------------------------------
# Building and writing


def build_columns(tables: list[ShardIndex]) -> dict[str, np.ndarray]:
    """The index columns of shards ``tables`` (in manifest order); CacheError on an id listed
    twice in one split, naming both shards' positions."""
    ids = [i.encode() for t in tables for i in t.image_id]
    sources = [NO_SOURCE if s is None else s.encode() for t in tables for s in t.source]
    n = len(ids)
    cols = {
        "split": np.array([SPLITS.index(t.split) for t in tables for _ in t.image_id], "|u1"),
        "shard": np.repeat(np.arange(len(tables), dtype="<i4"), [len(t) for t in tables]),
        "local": np.concatenate(
            [np.arange(len(t), dtype="<i4") for t in tables] or [np.zeros(0, "<i4")]
        ),
    }
    for name in ("teacher_start", "teacher_count", "gt_start", "gt_count"):
        values = [v for t in tables for v in getattr(t, name)]
        if values and max(values) > np.iinfo(np.int32).max:
            raise CacheError(f"a shard has more than 2**31 rows in {name}")
        cols[name] = np.array(values, "<i4").reshape(n)
    for name in ("orig_hw", "input_hw"):
        cols[name] = np.array([v for t in tables for v in getattr(t, name)], "<i4").reshape(n, 2)
    cols.update(_strings("image_id", ids))
    cols.update(_strings("source", sources))
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(i, digest_size=8).digest(), "little") for i in ids], "<u8"
    )
    order = np.argsort(hashes, kind="stable").astype("<i4" if n < 2**31 else "<i8")
    cols["lookup.hash"], cols["lookup.order"] = hashes[order], order
    return cols


def _strings(name: str, items: list[bytes]) -> dict[str, np.ndarray]:
    offsets = np.zeros(len(items) + 1, "<i8")
    np.cumsum([len(b) for b in items], out=offsets[1:])
    return {f"{name}.bytes": np.frombuffer(b"".join(items), "|u1"), f"{name}.offsets": offsets}


def write_index(root: str, columns: dict[str, np.ndarray]) -> IndexInfo:
    """Write ``columns`` under ``root/index/<token>/`` (token: from the content) and return what
    the manifest records; an index with the same content is reused."""
    parent = os.path.join(root, INDEX_DIR)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        files = {
            name: _save(os.path.join(tmp, f"{name}.npy"), arr) for name, arr in columns.items()
        }
        digest = hashlib.sha256(
            "".join(f"{k}:{v.sha256}" for k, v in sorted(files.items())).encode()
        )
        token = digest.hexdigest()[:16]
        final = os.path.join(parent, token)
        if os.path.isdir(final):
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexInfo(f"{INDEX_DIR}/{token}", int(len(columns["split"])), files)


def _save(path: str, arr: np.ndarray) -> IndexFile:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        raw = f.read()
    return IndexFile(len(raw), google_crc32c.value(raw), hashlib.sha256(raw).hexdigest())


def prune_indexes(root: str, keep: set[str]) -> None:
    """Remove index folders (and leftovers of killed writers) other than ``keep`` (rel paths)."""
    parent = os.path.join(root, INDEX_DIR)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if f"{INDEX_DIR}/{name}" not in keep:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
