"""The cached teacher's masks of an image in the original frame, for overlay pictures.

Shared by ``maskteacher eval`` and the trainer's ``visual`` section (reads the cache with
:mod:`maskteacher.cache_format`, maps low-res logits back with
:func:`maskteacher.models.everything.lowres_to_masks`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from maskteacher.cache_format import CacheReader, logits_to_float, open_cache
from maskteacher.models.everything import lowres_to_masks

log = logging.getLogger(__name__)


def open_teacher_cache(path: str | None, split: str, image_size: int) -> CacheReader | None:
    """The teacher cache at ``path`` for ``split``, or None (with a warning) when no cache is
    given, it does not exist, or it holds no image of the split."""
    if not path:
        return None
    if "://" not in str(path) and not (Path(path) / "manifest.json").is_file():
        log.warning("teacher cache %s not found: teacher agreement is not computed", path)
        return None
    everything = open_cache(path, expect={"image_size": image_size})
    listed = split in everything.header.fingerprints
    if not listed and not any(entry.split == split for entry in everything.manifest.shards):
        log.warning("teacher cache %s holds no '%s' split: no teacher panel", path, split)
        return None
    reader = open_cache(path, split=split, expect={"image_size": image_size})
    if len(reader) == 0:
        log.warning("teacher cache %s holds no '%s' images: no teacher agreement", path, split)
        return None
    return reader


def teacher_masks_original(
    reader: CacheReader, ids: set[str], image_id: str, *, image_size: int, input_hw, orig_hw
) -> np.ndarray | None:
    """The cached teacher masks of ``image_id`` as (N, H, W) bool in the original frame; None
    when the cache (whose ids are ``ids``) does not hold the image."""
    if image_id not in ids:
        return None
    record = reader[image_id]
    logits = torch.from_numpy(logits_to_float(record.teacher_logits, reader.header.codec))
    return (
        lowres_to_masks(logits, image_size=image_size, input_hw=input_hw, orig_hw=orig_hw)
        .numpy()
        .astype(bool)
    )
