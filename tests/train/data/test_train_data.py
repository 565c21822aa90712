"""Training data: reader vs cache ground truth, flips, collate, cache/dataset mismatches."""

from __future__ import annotations

import pytest
import torch
from train_helpers import IMAGE_SIZE, make_data, write_cache

from maskteacher.cache_format import CacheError
from maskteacher.data import hflip_input, hflip_lowres, open_dataset
from maskteacher.errors import UserError
from maskteacher.train.data.batch import collate
from maskteacher.train.data.cache import open_cache_targets
from maskteacher.train.data.dataset import TrainDataset
from maskteacher.train.data.prompts import EverythingPromptSpec, SinglePromptSpec, SingleSettings
from maskteacher.train.data.sampler import ResumableSampler

L = IMAGE_SIZE // 4


def dataset(images, **kw) -> TrainDataset:
    kw.setdefault("prompts", EverythingPromptSpec(source="gt", grid_points=4, max_prompts=8))
    return TrainDataset(images, image_size=IMAGE_SIZE, **kw)


def test_reader_item_shapes(sample_data):
    images = open_dataset(sample_data["train"])
    item = dataset(images)[0]
    assert item.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item.image.dtype == torch.uint8
    assert max(item.input_hw) == IMAGE_SIZE and item.orig_hw == images[0].orig_hw
    assert item.gt_masks.dtype == torch.bool and item.gt_masks.shape[1:] == (L, L)
    assert item.gt_masks.flatten(1).any(1).all()  # empty low-res objects dropped
    assert len(item.prompts) == min(8, item.gt_masks.shape[0])
    assert item.teacher is None and not item.flipped


def test_cache_ground_truth_equals_reader(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]})
    images = open_dataset(sample_data["train"])
    source = open_cache_targets(str(cache), split="train", images=images, image_size=IMAGE_SIZE)
    from_cache = dataset(images, targets=source)
    from_reader = dataset(images)
    for i in range(len(images)):
        a, b = from_cache[(i, 3)], from_reader[(i, 3)]
        assert torch.equal(a.gt_masks, b.gt_masks) and torch.equal(a.image, b.image)
        assert torch.equal(a.prompts.points, b.prompts.points)
    assert source.cache_id.startswith("sha256:")


def test_hflip_is_consistent_for_image_gt_prompts_and_teacher(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, teacher=True)
    images = open_dataset(sample_data["train"])
    source = open_cache_targets(
        str(cache), split="train", images=images, image_size=IMAGE_SIZE,
        teacher_fields=frozenset({"logits", "points"}),
    )  # fmt: skip
    plain = dataset(images, targets=source, prompts=EverythingPromptSpec("teacher", 4, 64))
    flipping = dataset(
        images, targets=source, hflip=True, prompts=EverythingPromptSpec("teacher", 4, 64)
    )
    flipped = [(i, e) for i in range(len(images)) for e in range(6) if flipping[(i, e)].flipped]
    assert flipped, "no flip in 12 draws"
    assert any(not flipping[(i, e)].flipped for i in range(2) for e in range(6))
    i, e = flipped[0]
    a, b = plain[(i, e)], flipping[(i, e)]
    assert torch.equal(b.image, hflip_input(a.image, a.input_hw))
    assert torch.equal(b.gt_masks, hflip_lowres(a.gt_masks, a.input_hw))
    # teacher logits and points flip together: every teacher point lies in its own mask
    logits = b.teacher.float_logits()
    assert logits.dtype == torch.float32 and float(logits.abs().max()) == pytest.approx(
        8.0, abs=0.1
    )
    assert b.teacher.logits.dtype == torch.int8  # stored dtype travels; dequantised on demand
    pts = b.teacher.points
    for k in range(pts.shape[0]):
        col, row = int(pts[k, 0] // 4), int(pts[k, 1] // 4)
        assert logits[k, row, col] > 0
    # the prompts are the (flipped) teacher points
    assert torch.equal(b.prompts.points[:, 0, :], pts)


def test_item_draws_depend_on_seed_epoch_index_only(sample_data):
    images = open_dataset(sample_data["train"])
    ds = dataset(images, hflip=True, prompts=EverythingPromptSpec("mixed", 4, 6))
    again = dataset(images, hflip=True, prompts=EverythingPromptSpec("mixed", 4, 6))
    assert torch.equal(ds[(1, 5)].prompts.points, again[(1, 5)].prompts.points)
    assert ds[(1, 5)].flipped == again[(1, 5)].flipped
    draws = {tuple(ds[(1, e)].prompts.points.flatten().tolist()) for e in range(4)}
    assert len(draws) > 1  # epochs differ


def test_collate_ragged_and_padded(sample_data):
    images = open_dataset(sample_data["train"])
    single = TrainDataset(
        images, image_size=IMAGE_SIZE,
        prompts=SinglePromptSpec(SingleSettings(mode="mixed", min_points=1, max_points=3, max_prompts=5)),
    )  # fmt: skip
    a, b = single[(0, 0)], single[(1, 0)]
    batch = collate([a, b])
    assert batch.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.prompt_offsets.tolist() == [0, len(a.prompts), len(a.prompts) + len(b.prompts)]
    assert (
        batch.points.shape[1]
        == batch.labels.shape[1]
        == max(a.prompts.points.shape[1], b.prompts.points.shape[1])
    )
    assert batch.prompt_image.tolist() == [0] * len(a.prompts) + [1] * len(b.prompts)
    assert [m.shape[0] for m in batch.gt_masks] == [a.gt_masks.shape[0], b.gt_masks.shape[0]]
    assert (batch.prompt_target >= 0).all()
    if batch.has_box.any():
        assert batch.boxes is not None and (batch.labels[batch.has_box] == -1).all()


def test_sampler_skip_and_keys():
    s = ResumableSampler(5, rank=0, world_size=1, shuffle=True, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert sorted(i for i, _ in full) == list(range(5)) and {e for _, e in full} == {2}
    s.set_skip(3)
    assert list(s) == full[3:] and len(s) == 2
    halves = [list(ResumableSampler(5, rank=r, world_size=2, shuffle=True, seed=3)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 3  # padded to a multiple of the world size


# ------------------------------------------------------------------------- cache mismatches


def test_cache_for_other_image_size(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, image_size=128)
    images = open_dataset(sample_data["train"])
    with pytest.raises(UserError, match="image_size 128.*model.image_size 64"):
        open_cache_targets(str(cache), split="train", images=images, image_size=IMAGE_SIZE)


def test_cache_for_other_dataset(sample_data, tmp_path):
    other = make_data(tmp_path / "other", images=2, seed=5)
    cache = write_cache(tmp_path / "cache", {"train": other})
    images = open_dataset(sample_data["train"])
    with pytest.raises(UserError, match="fingerprint of split 'train'"):
        open_cache_targets(str(cache), split="train", images=images, image_size=IMAGE_SIZE)


def test_cache_missing_images_and_failures(sample_data, tmp_path):
    images = open_dataset(sample_data["train"])
    first = images.image_ids[0]
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, skip=(first,))
    with pytest.raises(
        UserError, match=f"1 of the 2 train images are not in the cache \\({first}\\)"
    ):
        open_cache_targets(str(cache), split="train", images=images, image_size=IMAGE_SIZE)
    cache2 = write_cache(tmp_path / "cache2", {"train": sample_data["train"]}, failed=(first,))
    source = open_cache_targets(str(cache2), split="train", images=images, image_size=IMAGE_SIZE)
    assert source.usable_indices == [1]
    ds = dataset(images, targets=source, indices=source.usable_indices)
    assert len(ds) == 1 and ds[0].image_id == images.image_ids[1]


def test_cache_without_needed_teacher_fields(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, teacher=False)
    images = open_dataset(sample_data["train"])
    with pytest.raises(UserError, match="precompute.store.teacher: true"):
        open_cache_targets(
            str(cache), split="train", images=images, image_size=IMAGE_SIZE,
            teacher_fields=frozenset({"points"}),
        )  # fmt: skip
    with pytest.raises(UserError, match="precompute.store.tokens: true"):
        open_cache_targets(
            str(cache), split="train", images=images, image_size=IMAGE_SIZE,
            teacher_fields=frozenset({"tokens"}),
        )  # fmt: skip
    with pytest.raises(CacheError, match="no split 'val'"):
        open_cache_targets(str(cache), split="val", images=images, image_size=IMAGE_SIZE)


def test_verify_on_open_reports_damage(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]})
    images = open_dataset(sample_data["train"])
    ok = open_cache_targets(
        str(cache), split="train", images=images, image_size=IMAGE_SIZE, verify=True
    )
    assert ok.usable_indices == [0, 1]
    victim = max(
        (p for p in (cache / "shards").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # verification is lazy: a shard's checksums are checked the first time it is read from
    damaged = open_cache_targets(
        str(cache), split="train", images=images, image_size=IMAGE_SIZE, verify=True
    )
    ds = dataset(images, targets=damaged, indices=damaged.usable_indices)
    with pytest.raises(CacheError, match="failed verification"):
        ds[0]
    unchecked = open_cache_targets(str(cache), split="train", images=images, image_size=IMAGE_SIZE)
    assert unchecked.usable_indices == [0, 1]  # without verify_on_open the open does not read
