"""The shareable teacher cache: schema, codecs, zarr v3 / HDF5 shards, index, manifest, reader,
writer.

Reads with numpy + zarr's codec libraries alone and imports nothing else from maskteacher.
Receivers of a cache call :func:`open_cache`; precompute uses :func:`init_cache`,
:class:`ShardWriter`, :func:`record_failure`, :func:`completed_ids` and :func:`finalize`; what a
cache must match is :mod:`.identity`'s one list. The on-disk layout is documented in
``docs/cache_format.md`` and stated in :mod:`.schema`.
"""

from maskteacher.cache_format.codecs import dequantize_torch, logits_to_float
from maskteacher.cache_format.errors import CacheError, CacheMismatch
from maskteacher.cache_format.identity import (
    CONTENT_FIELDS,
    GENERATION_KEYS,
    LAYOUT_FIELDS,
    OPTIONAL_GENERATION_KEYS,
    Mismatch,
    dataset_fingerprint,
    expectation_mismatch,
    header_mismatch,
)
from maskteacher.cache_format.manifest import Manifest
from maskteacher.cache_format.raw import RawRecord, decode_many, decode_raw, split_raw
from maskteacher.cache_format.reader import CacheReader, open_cache
from maskteacher.cache_format.schema import (
    DEFAULT_BACKEND,
    FORMAT_VERSION,
    CacheHeader,
    CacheRecord,
    Codec,
    StoreFlags,
)
from maskteacher.cache_format.shard_writer import ShardWriter
from maskteacher.cache_format.writer import (
    completed_ids,
    finalize,
    init_cache,
    new_shard_name,
    record_failure,
)

__all__ = [
    "CONTENT_FIELDS",
    "DEFAULT_BACKEND",
    "FORMAT_VERSION",
    "GENERATION_KEYS",
    "LAYOUT_FIELDS",
    "OPTIONAL_GENERATION_KEYS",
    "CacheError",
    "CacheHeader",
    "CacheMismatch",
    "CacheReader",
    "CacheRecord",
    "Codec",
    "Manifest",
    "Mismatch",
    "RawRecord",
    "ShardWriter",
    "StoreFlags",
    "completed_ids",
    "dataset_fingerprint",
    "decode_many",
    "split_raw",
    "decode_raw",
    "dequantize_torch",
    "expectation_mismatch",
    "finalize",
    "header_mismatch",
    "init_cache",
    "logits_to_float",
    "new_shard_name",
    "open_cache",
    "record_failure",
]
