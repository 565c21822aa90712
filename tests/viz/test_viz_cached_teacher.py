"""A cached teacher's masks in the original frame (the teacher panel and eval's teacher
agreement), and when there is no cached teacher to show."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from maskteacher.cache_format import (
    CacheError,
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    finalize,
    init_cache,
)
from maskteacher.viz import mask_outlines
from maskteacher.viz.cached_teacher import open_teacher_cache, teacher_masks_original

S = 64  # image_size; low-res L = 16, one low-res pixel = 4 input pixels
ORIG_HW, INPUT_HW = (48, 64), (48, 64)  # longest side already S: input frame = original frame


def box(r0: int, r1: int, c0: int, c1: int, size: int = S // 4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


def write(root, splits: dict[str, list[str]], *, codec: str = "int8", fingerprinted=()):
    """A cache whose images each hold two teacher masks (low-res boxes as +-8 logits)."""
    header = CacheHeader(
        teacher_type="vit_b_tiny",
        checkpoint_sha256="0" * 64,
        image_size=S,
        params={"points_per_side": 4},
        codec=Codec(name=codec),
        store=StoreFlags(teacher=True, gt=True),
        fingerprints={s: f"sha256:{s}" for s in (*splits, *fingerprinted)},
    )
    init_cache(root, header)
    masks = np.stack([box(0, 4, 0, 8), box(8, 12, 4, 16)])
    for split, ids in splits.items():
        with ShardWriter(root, f"{split}-0", split=split) as writer:
            for image_id in ids:
                writer.add(
                    CacheRecord(
                        image_id=image_id,
                        split=split,
                        orig_hw=np.asarray(ORIG_HW, np.int64),
                        input_hw=np.asarray(INPUT_HW, np.int64),
                        teacher_logits=np.where(masks, 8.0, -8.0).astype(np.float32),
                        teacher_points=np.zeros((2, 2), np.float32),
                        teacher_iou=np.full(2, 0.9, np.float32),
                        teacher_stability=np.full(2, 0.95, np.float32),
                        teacher_boxes=np.zeros((2, 4), np.float32),
                        gt_masks=np.zeros((0, S // 4, S // 4), bool),
                    )
                )
    finalize(root)
    return root


@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_teacher_masks_in_the_original_frame(tmp_path, codec):
    cache = write(tmp_path / "cache", {"val": ["a", "b"]}, codec=codec)
    reader = open_teacher_cache(str(cache), "val", S)
    ids = set(reader.image_ids)
    assert ids == {"a", "b"}
    masks = teacher_masks_original(
        reader, ids, "b", image_size=S, input_hw=INPUT_HW, orig_hw=ORIG_HW
    )
    assert masks.shape == (2, *ORIG_HW) and masks.dtype == bool
    # low-res rows 0-3 x cols 0-7 are input (= original) rows 0-15 x cols 0-31; bilinear
    # upsampling of +-8 logits crosses 0 at the box edge, where rounding decides a corner pixel
    want = np.zeros((2, *ORIG_HW), bool)
    want[0, 0:16, 0:32] = True
    want[1, 32:48, 16:64] = True
    edge = mask_outlines(want)
    np.testing.assert_array_equal(masks[~edge], want[~edge])
    assert masks[edge].mean() > 0.95
    assert (
        teacher_masks_original(reader, ids, "c", image_size=S, input_hw=INPUT_HW, orig_hw=ORIG_HW)
        is None
    )  # not in the cache: no teacher panel


def test_no_cache_to_show(tmp_path, caplog):
    assert open_teacher_cache(None, "val", S) is None
    with caplog.at_level(logging.WARNING):
        assert open_teacher_cache(str(tmp_path / "nowhere"), "val", S) is None
    assert "not found" in caplog.text
    # the split is listed but every image of it failed in precompute: nothing to show
    cache = write(tmp_path / "cache", {"train": ["a"]}, fingerprinted=("val",))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert open_teacher_cache(str(cache), "val", S) is None
    assert "holds no 'val' images" in caplog.text
    # a cache made at another image size is an error, not a silently wrong picture
    with pytest.raises(CacheError, match="image_size"):
        open_teacher_cache(str(cache), "train", 2 * S)


def test_cache_without_the_split_shows_no_teacher(tmp_path, caplog):
    cache = write(tmp_path / "cache", {"train": ["a"]})  # precompute of the train split only
    with caplog.at_level(logging.WARNING):
        assert open_teacher_cache(str(cache), "val", S) is None
    assert "val" in caplog.text
