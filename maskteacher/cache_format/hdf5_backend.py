"""HDF5 shards: one file ``<name>.h5`` with one chunked dataset per row array.

Datasets are chunked ``(chunk_rows, *row_shape)`` with the standard filter pipeline
``[shuffle (float16 only), zstd (registered filter id 32015, level), fletcher32]``. The writer
compresses chunks itself and stores them with ``write_direct_chunk`` (h5py ships no zstd filter);
any HDF5 reader with the zstd plugin loaded (``import hdf5plugin``) reads the datasets directly,
and plain h5py reads the raw chunks with ``dset.id.read_direct_chunk`` and decodes them with
numcodecs (docs/cache_format.md shows how). The per-image table is the JSON text in the uint8
dataset ``maskteacher_index`` (chunked, fletcher32: HDF5 checks it on every read).

Files are written with the HDF5 1.10 file format (``libver=("v110", "v110")``, readable by HDF5
>= 1.10): its superblock, object headers and chunk indexes carry checksums that HDF5 checks when
it reads them. The default (earliest) format has none, which is why corrupted headers could be
read without error; format-1 caches written that way are still read, and ``cache verify``'s
sha256 covers them. The reader asks h5py only where each chunk lies
(``get_chunk_info_by_coord``) and reads the bytes itself, checking fletcher32 before decoding.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from maskteacher.cache_format.codecs import ChunkCodec
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.jsonio import parse_json
from maskteacher.cache_format.layout import ArraySpec, ChunkLocation
from maskteacher.cache_format.schema import INDEX_KEY
from maskteacher.cache_format.storage import ByteSource, LocalSource

H5Z_FILTER_ZSTD = 32015
H5Z_FILTER_SHUFFLE = 2
H5Z_FILTER_FLETCHER32 = 3
#: HDF5 file format of new shards: the first with checksummed metadata (HDF5 1.10).
LIBVER = ("v110", "v110")


class Hdf5ShardWriter:
    """Writes one ``.h5`` shard file (the caller owns it exclusively)."""

    suffix = ".h5"

    def __init__(self, path: str) -> None:
        import h5py

        self.path = path
        self._file = h5py.File(path, "w-", libver=LIBVER)
        self._file.attrs["format"] = "maskteacher-cache shard"

    def create(self, spec: ArraySpec) -> None:
        if spec.name in self._file:
            return
        self._file.create_dataset(
            spec.name,
            shape=(0, *spec.row_shape),
            maxshape=(None, *spec.row_shape),
            chunks=spec.chunk_shape,
            dtype=np.dtype(spec.dtype),
            compression=H5Z_FILTER_ZSTD,
            compression_opts=(int(spec.codec.level),),
            shuffle=spec.codec.compressor == "shuffle+zstd",
            fletcher32=True,
            allow_unknown_filter=True,
        )

    def write(self, spec: ArraySpec, start: int, rows: np.ndarray) -> None:
        dset = self._file[spec.name]
        end = start + rows.shape[0]
        dset.resize((end, *spec.row_shape))
        zeros = (0,) * len(spec.row_shape)
        for k in range(0, rows.shape[0], spec.chunk_rows):
            chunk = rows[k : k + spec.chunk_rows]
            dset.id.write_direct_chunk((start + k, *zeros), spec.codec.encode(chunk))

    def close(self, index: dict[str, Any]) -> None:
        text = np.frombuffer(json.dumps(index, separators=(",", ":")).encode(), np.uint8)
        self._file.create_dataset(
            INDEX_KEY, data=text, chunks=(min(max(text.size, 1), 1 << 20),), fletcher32=True
        )
        self._file.close()

    def abort(self) -> None:
        if self._file.id.valid:
            self._file.close()


class Hdf5ShardReader:
    """Locates chunks of a finished ``.h5`` shard; opens the file anew in each process."""

    def __init__(
        self,
        source: ByteSource,
        shard_rel: str,
        specs: dict[str, ArraySpec] | None = None,
        digests: dict[str, str] | None = None,
    ) -> None:
        self.source = source
        self.shard_rel = shard_rel
        self._pid = -1
        self._file: Any = None
        self._stale: list[Any] = []  # handles inherited through fork: never touched again
        self._locations: dict[tuple[str, int], ChunkLocation] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "shard_rel": self.shard_rel}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["shard_rel"])  # type: ignore[misc]

    @property
    def where(self) -> str:
        return self.source.describe(self.shard_rel)

    def _h5(self) -> Any:
        import h5py

        if self._file is not None and self._pid == os.getpid():
            return self._file
        if self._file is not None:
            self._stale.append(self._file)
        try:
            if isinstance(self.source, LocalSource):
                self._file = h5py.File(self.source.path(self.shard_rel), "r")
            else:
                self._file = h5py.File(self.source.open_binary(self.shard_rel), "r")
        except FileNotFoundError:
            raise CacheError(f"missing file {self.where}") from None
        except OSError as exc:
            raise CacheError(f"{self.where}: not a readable HDF5 file ({exc})") from None
        self._pid = os.getpid()
        return self._file

    def read_index(self) -> Any:
        f = self._h5()
        if INDEX_KEY not in f:
            raise CacheError(f"{self.where}: HDF5 shard has no {INDEX_KEY!r} dataset")
        try:
            raw = f[INDEX_KEY][()].tobytes()
        except OSError as exc:  # HDF5 found a checksum (fletcher32 / metadata) mismatch
            raise CacheError(f"{self.where}: cannot read {INDEX_KEY!r} ({exc})") from None
        return parse_json(raw, self.where)

    def array_spec(self, name: str, expected: ArraySpec) -> ArraySpec:
        """Check dataset ``name`` against ``expected`` (dtype, rows, filters); the stored spec."""
        where = f"{self.where}:/{name}"
        f = self._h5()
        if name not in f:
            raise CacheError(f"{where}: dataset is missing")
        dset = f[name]
        dtype = np.dtype(expected.dtype)
        if dset.dtype != dtype:
            raise CacheError(f"{where}: dtype {dset.dtype}, expected {dtype}")
        if tuple(dset.shape[1:]) != tuple(expected.row_shape) or dset.chunks is None:
            raise CacheError(
                f"{where}: shape {dset.shape} / chunks {dset.chunks} do not fit rows {expected.row_shape}"
            )
        if tuple(dset.chunks[1:]) != tuple(expected.row_shape):
            raise CacheError(f"{where}: chunks {dset.chunks} do not hold whole rows")
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
        ids = [flt[0] for flt in filters]
        shuffle = dtype == np.float16
        want = ([H5Z_FILTER_SHUFFLE] if shuffle else []) + [H5Z_FILTER_ZSTD, H5Z_FILTER_FLETCHER32]
        if ids != want:
            raise CacheError(f"{where}: filter pipeline {ids}, expected {want}")
        level = int(filters[-2][2][0]) if filters[-2][2] else 3
        codec = ChunkCodec(
            "shuffle+zstd" if shuffle else "zstd", "fletcher32", level, dtype.itemsize
        )
        return ArraySpec(name, expected.dtype, expected.row_shape, int(dset.chunks[0]), codec)

    def locate(self, name: str, chunk: int) -> ChunkLocation:
        key = (name, chunk)
        loc = self._locations.get(key)
        if loc is None:
            loc = self._locations[key] = self._find(name, chunk)
        return loc

    def _find(self, name: str, chunk: int) -> ChunkLocation:
        what = f"{self.where}: chunk {chunk} of {name!r}"
        try:
            dset = self._h5()[name]
            coord = (chunk * dset.chunks[0], *([0] * (len(dset.shape) - 1)))
            if coord[0] >= dset.shape[0]:
                raise CacheError(f"{what} is past the dataset end")
            info = dset.id.get_chunk_info_by_coord(coord)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise CacheError(f"{what}: {exc}") from None
        if info.byte_offset is None:
            raise CacheError(f"{what} is missing")
        if info.filter_mask != 0:
            raise CacheError(f"{what} skipped filters")
        return ChunkLocation(self.shard_rel, int(info.byte_offset), int(info.size))

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._locations.clear()
