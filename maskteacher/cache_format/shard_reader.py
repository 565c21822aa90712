"""Reading one finished shard: where an image's chunks are, and their stored bytes.

The rows of an image come from the cache's index (:class:`ImageRows`); the array layout comes
from the manifest (format 2) or from the shard's own metadata (format 1, and ``cache verify``,
which also compares the shard's own table with the index).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.hdf5_backend import Hdf5ShardReader
from maskteacher.cache_format.layout import ArraySpec, ChunkLocation, array_specs
from maskteacher.cache_format.manifest import ShardEntry
from maskteacher.cache_format.raw import RawField
from maskteacher.cache_format.schema import ARRAY_BY_NAME, DATA_DIM_ARRAYS, CacheHeader
from maskteacher.cache_format.shard_table import ShardIndex
from maskteacher.cache_format.storage import ByteSource
from maskteacher.cache_format.zarr_backend import ZarrShardReader

BACKEND_READERS = {"zarr": ZarrShardReader, "hdf5": Hdf5ShardReader}


class ImageRows(NamedTuple):
    """Where one image lives in its shard: position, first row and row count per row space."""

    local: int
    teacher_start: int
    teacher_count: int
    gt_start: int
    gt_count: int

    def span(self, space: str) -> tuple[int, int]:
        if space == "image":
            return self.local, 1
        if space == "teacher":
            return self.teacher_start, self.teacher_count
        return self.gt_start, self.gt_count


class ShardReader:
    """One finished shard. ``layout``: the manifest's array specs, or None to read them from
    the shard (then ``entry.files`` sha256 are used to check the metadata read)."""

    def __init__(
        self,
        source: ByteSource,
        entry: ShardEntry,
        header: CacheHeader,
        layout: dict[str, ArraySpec] | None,
    ) -> None:
        self.source = source
        self.entry = entry
        self.header = header
        digests = None if entry.files is None else {f.path: f.sha256 for f in entry.files}
        self.backend: Any = BACKEND_READERS[entry.backend](source, entry.path, layout, digests)
        self._specs = None if layout is None else dict(layout)
        self._table: ShardIndex | None = None

    @property
    def where(self) -> str:
        return self.entry.path

    def table(self) -> ShardIndex:
        """The shard's own per-image table, checked against its manifest entry."""
        if self._table is None:
            idx = ShardIndex.from_json(self.backend.read_index(), self.source.describe(self.where))
            if idx.split != self.entry.split:
                raise CacheError(
                    f"shard {self.where}: its table says split {idx.split!r}, the manifest {self.entry.split!r}"
                )
            if self.entry.image_ids is not None and idx.image_id != self.entry.image_ids:
                raise CacheError(
                    f"shard {self.where}: its image ids differ from the manifest's list"
                )
            self._table = idx
        return self._table

    def specs(self) -> dict[str, ArraySpec]:
        """The arrays of this shard (from the manifest's layout, or read from the shard)."""
        if self._specs is None:
            self._specs = self.stored_specs()
        return self._specs

    def stored_specs(self) -> dict[str, ArraySpec]:
        """The array specs the shard itself declares, checked against what its header implies."""
        table = self.table()
        if not len(table):
            return {}
        expected = array_specs(self.header, {n: table.dims.get(n, 0) for n in DATA_DIM_ARRAYS})
        for name in DATA_DIM_ARRAYS:
            if name in expected and name not in table.dims:
                raise CacheError(
                    f"shard {self.where}: its table does not record the channel count of {name!r}"
                )
        return {name: self.backend.array_spec(name, spec) for name, spec in expected.items()}

    def plan(
        self, rows: ImageRows, arrays: set[str] | None = None
    ) -> list[tuple[ArraySpec, int, list[ChunkLocation]]]:
        """For one image: each (wanted) array's spec, row count and the chunk locations to read
        (whole chunks; rows past the count are padding)."""
        out = []
        for name, spec in self.specs().items():
            if arrays is not None and name not in arrays:
                continue
            start, count = rows.span(ARRAY_BY_NAME[name].space)
            if start % spec.chunk_rows:
                raise CacheError(f"{name} rows start at {start}, not on a chunk boundary")
            first = start // spec.chunk_rows
            chunks = range(first, first + -(-count // spec.chunk_rows))
            out.append((spec, count, [self.backend.locate(name, j) for j in chunks]))
        return out

    def fetch(self, rows: ImageRows, arrays: set[str] | None = None) -> dict[str, RawField]:
        """The stored bytes of one image's (wanted) arrays."""
        return {
            spec.name: self._fetch(spec, count, locs)
            for spec, count, locs in self.plan(rows, arrays)
        }

    def _fetch(self, spec: ArraySpec, count: int, locs: list[ChunkLocation]) -> RawField:
        if not locs:
            return RawField(spec, count, b"", [])
        lo = min(loc.offset for loc in locs)
        hi = max(loc.offset + loc.nbytes for loc in locs)
        if len({loc.file for loc in locs}) == 1 and hi - lo <= 2 * sum(loc.nbytes for loc in locs):
            blob = self.source.read(locs[0].file, lo, hi)
            spans = [(loc.offset - lo, loc.offset - lo + loc.nbytes) for loc in locs]
        else:  # chunks far apart or in several zarr shard files: one read each
            parts, spans, pos = [], [], 0
            for loc in locs:
                parts.append(self.source.read(loc.file, loc.offset, loc.offset + loc.nbytes))
                spans.append((pos, pos + loc.nbytes))
                pos += loc.nbytes
            blob = b"".join(parts)
        return RawField(spec, count, blob, spans)

    def close(self) -> None:
        self.backend.close()
