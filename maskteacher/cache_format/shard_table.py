"""The per-image table inside each shard (:class:`ShardIndex`), stored as JSON in the shard:
the zarr group attribute / HDF5 dataset named :data:`~.schema.INDEX_KEY`. It makes every shard
self-describing (the finished images of a cache can be recovered from its shards alone); the
cache-wide index (:mod:`.index`) is built from these tables by ``finalize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import as_dict, free_object, get
from maskteacher.cache_format.schema import SHARD_TABLE_VERSION


@dataclass
class ShardIndex:
    """Per-image table of one shard, stored as JSON inside the shard itself.

    Column lists of equal length (one entry per image, in write order); ``teacher_start`` /
    ``gt_start`` are row offsets into the row arrays (multiples of the chunk rows).
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
    format_version: int = SHARD_TABLE_VERSION

    COLUMNS = (
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
        out.update({c: getattr(self, c) for c in self.COLUMNS})
        out.update(
            teacher_rows=self.teacher_rows, gt_rows=self.gt_rows, dims=self.dims, quant=self.quant
        )
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardIndex:
        d = as_dict(data, where)
        version = get(d, "format_version", int, where)
        if version != SHARD_TABLE_VERSION:
            raise CacheError(
                f"{where}: shard table version is {version}, this reader reads {SHARD_TABLE_VERSION}"
            )
        idx = cls(
            split=get(d, "split", str, where),
            teacher_rows=get(d, "teacher_rows", int, where),
            gt_rows=get(d, "gt_rows", int, where),
            dims=get(d, "dims", dict, where),
            quant=free_object(d, "quant", where),
        )
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in idx.dims.values()):
            raise CacheError(f"{where}: index 'dims' must map array names to positive ints")
        n = None
        for col in cls.COLUMNS:
            values = get(d, col, list, where)
            if n is not None and len(values) != n:
                raise CacheError(
                    f"{where}: index column {col!r} has {len(values)} entries, expected {n}"
                )
            n = len(values)
            setattr(idx, col, values)
        idx.check(where)
        return idx

    def check(self, where: str) -> None:
        """Types and ranges of every column; CacheError naming ``where`` when malformed."""
        try:
            for name in ("teacher_start", "teacher_count", "gt_start", "gt_count"):
                values = getattr(self, name)
                if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                    raise ValueError(f"{name} must hold integers")
                if values and min(values) < 0:
                    raise ValueError(f"negative entry in {name}")
            for name, rows in (("teacher", self.teacher_rows), ("gt", self.gt_rows)):
                start = np.asarray(getattr(self, f"{name}_start"), dtype=np.int64)
                count = np.asarray(getattr(self, f"{name}_count"), dtype=np.int64)
                if start.size and int((start + count).max()) > rows:
                    raise ValueError(f"{name} rows run past the array end ({rows} rows)")
            for hw in (*self.orig_hw, *self.input_hw):
                if len(hw) != 2 or any(not isinstance(v, int) or v <= 0 for v in hw):
                    raise ValueError(f"bad image size {hw!r}")
            if any(not isinstance(i, str) or not i for i in self.image_id):
                raise ValueError("image ids must be non-empty strings")
            if any(s is not None and not isinstance(s, str) for s in self.source):
                raise ValueError("sources must be strings or null")
        except (TypeError, ValueError) as exc:
            raise CacheError(f"{where}: malformed shard index: {exc}") from None
        if len(set(self.image_id)) != len(self.image_id):
            raise CacheError(f"{where}: shard index lists an image id twice")
