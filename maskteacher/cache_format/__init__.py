"""The shareable teacher cache: schema, codecs, zarr v3 / HDF5 shards, manifest, reader, writer.

Reads with numpy + zarr's codec libraries alone and imports nothing else from maskteacher.
Receivers of a cache call :func:`open_cache`; precompute uses :func:`init_cache`,
:class:`ShardWriter`, :func:`record_failure`, :func:`completed_ids` and :func:`finalize`.
The on-disk layout is documented in ``docs/cache_format.md`` and stated in :mod:`.schema`.
"""

from maskteacher.cache_format.codecs import dequantize_torch, logits_to_float
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import dataset_fingerprint
from maskteacher.cache_format.reader import (
    CacheReader,
    RawRecord,
    decode_many,
    decode_raw,
    open_cache,
)
from maskteacher.cache_format.schema import (
    DEFAULT_BACKEND,
    FORMAT_VERSION,
    CacheHeader,
    CacheRecord,
    Codec,
    Manifest,
    StoreFlags,
)
from maskteacher.cache_format.writer import (
    ShardWriter,
    completed_ids,
    finalize,
    init_cache,
    new_shard_name,
    record_failure,
)

__all__ = [
    "DEFAULT_BACKEND",
    "FORMAT_VERSION",
    "CacheError",
    "CacheHeader",
    "CacheReader",
    "CacheRecord",
    "Codec",
    "Manifest",
    "RawRecord",
    "ShardWriter",
    "StoreFlags",
    "completed_ids",
    "dataset_fingerprint",
    "decode_many",
    "decode_raw",
    "dequantize_torch",
    "finalize",
    "init_cache",
    "logits_to_float",
    "new_shard_name",
    "open_cache",
    "record_failure",
]
