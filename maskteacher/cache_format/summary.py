"""``cache inspect``: summarise a cache from its manifest and two index columns (format 2 reads
no shard at all; format 1 reads each shard's table)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from maskteacher.cache_format.manifest import load_manifest
from maskteacher.cache_format.reader import load_index
from maskteacher.cache_format.storage import make_source


def inspect_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a cache: counts, masks per image, bytes per image (all shards' files / images;
    with stored embeddings also one embedding's uncompressed fp16 bytes), codec, teacher,
    parameters, the teacher decoder weights file, quantisation statistics and failed images."""
    source = make_source(path)
    manifest = load_manifest(source)
    index = load_index(source, manifest)
    h = manifest.header
    total_bytes = sum(s.bytes for s in manifest.shards)
    splits: dict[str, int] = {}
    for s in manifest.shards:
        splits[s.split] = splits.get(s.split, 0) + s.images
    quant = manifest.quant if manifest.version >= 2 else _v1_quant(manifest.shards)
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
        "masks_per_image": _spread(index.col("teacher_count") if len(index) else np.zeros(0)),
        "gt_masks_per_image": _spread(index.col("gt_count") if len(index) else np.zeros(0)),
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / manifest.images if manifest.images else None,
        "embedding_bytes_per_image": _embedding_bytes(manifest),
        "teacher_decoder": None if manifest.decoder is None else manifest.decoder.to_json(),
        "quantisation": {
            "clipped_fraction_max": quant.get("clipped_fraction_max"),
            "max_err_inside_8": quant.get("max_err_band"),
        },
        "failed_images": [f.to_json() for f in manifest.failures],
    }


def _embedding_bytes(manifest: Any) -> int | None:
    """Uncompressed bytes of one image's stored embedding (fp16, C x E x E; None without)."""
    spec = (manifest.layout or {}).get("embedding")
    return None if spec is None else spec.row_nbytes


def _v1_quant(shards: list[Any]) -> dict[str, Any]:
    clipped = [
        s.quant["clipped_fraction"] for s in shards if s.quant.get("clipped_fraction") is not None
    ]
    errors = [s.quant["max_err_band"] for s in shards if s.quant.get("max_err_band") is not None]
    return {
        "clipped_fraction_max": max(clipped) if clipped else None,
        "max_err_band": max(errors) if errors else None,
    }


def _spread(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:
        return {"min": None, "median": None, "max": None}
    median = float(np.median(values))
    return {
        "min": int(values.min()),
        "median": int(median) if median.is_integer() else median,
        "max": int(values.max()),
    }
