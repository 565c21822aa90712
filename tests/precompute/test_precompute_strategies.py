"""Generation speed: the hierarchical prompt strategy (maskteacher.models.strategies), the speed
options (SDPA encoder attention, torch.compile of the decoder calls)
and how they reach the cache header."""

from __future__ import annotations

import pytest
import torch
from precompute_helpers import GEN, IMAGE_SIZE, make_teacher, run_cli, write_config

from maskteacher.cache_format.manifest import load_header
from maskteacher.data import generate_sample, point_grid, to_model_input
from maskteacher.models.everything import GenerationParams, generate_everything
from maskteacher.models.filtering import Kept
from maskteacher.models.strategies import coverage, hierarchical, sparse_grid

LOW = IMAGE_SIZE // 4
KWARGS = {
    "points_per_side": 8,
    "points_per_batch": 20,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.3,
    "box_nms_thresh": 0.9,
}


def _inputs(count: int = 2, seed: int = 5):
    samples = generate_sample(count, seed=seed, size_range=(90, 150))
    pairs = [to_model_input(s.image, IMAGE_SIZE) for s in samples]
    images = torch.stack([x for x, _ in pairs])
    return images, [hw for _, hw in pairs], [s.image.shape[:2] for s in samples]


def test_sparse_grid_takes_every_stride_th_row_and_column():
    sparse = sparse_grid(8, 4).reshape(8, 8)
    assert sparse.nonzero().tolist() == [[2, 2], [2, 6], [6, 2], [6, 6]]
    assert int(sparse_grid(32, 4).sum()) == 64 and int(sparse_grid(5, 1).sum()) == 25


def _kept(logits: torch.Tensor, image: torch.Tensor) -> Kept:
    n = logits.shape[0]
    return Kept(logits, torch.zeros(n, 2), torch.ones(n), torch.ones(n), torch.zeros(n, 4), image,
                None)  # fmt: skip


def test_hierarchical_decodes_the_sparse_grid_then_the_uncovered_points():
    """A first pass that keeps one confident mask (logit 10 on the left half of image 0, 5 on
    the top half) skips exactly the grid points under the confident part, on image 0 only."""
    side, images = 8, 2
    grid_pts = torch.from_numpy(point_grid(side, (IMAGE_SIZE, IMAGE_SIZE)))
    points = grid_pts.repeat(images, 1)
    image = torch.arange(images).repeat_interleave(side * side)
    mask = torch.full((1, LOW, LOW), -10.0)
    mask[0, :, : LOW // 2] = 10.0  # left half: confident
    mask[0, : LOW // 2, LOW // 2 :] = 5.0  # top right: kept, not confident
    calls = []

    def run(pts, img):
        calls.append((pts, img))
        first = len(calls) == 1
        return _kept(mask if first else mask[:0], torch.zeros(1 if first else 0, dtype=torch.long))

    kept, decoded = hierarchical(
        run, points, image, num_images=images, points_per_batch=1000, points_per_side=side,
        stride=4, logit_thresh=8.5,
    )  # fmt: skip
    assert len(calls) == 2 and len(kept) == 2
    assert calls[0][0].shape[0] == 4 * images  # 2 x 2 sparse points per image
    second_pts, second_img = calls[1]
    left = grid_pts[:, 0] < IMAGE_SIZE / 2
    assert int((second_img == 0).sum()) == int((~left).sum()) - 2  # minus the 2 sparse ones
    assert int((second_img == 1).sum()) == side * side - 4
    assert (second_pts[second_img == 0][:, 0] >= IMAGE_SIZE / 2).all()
    assert decoded == [4 + int((~left).sum()) - 2, side * side]
    assert coverage([_kept(mask[:0], torch.zeros(0, dtype=torch.long))], 2, 8.5) is None


def _same_outputs(a, b, atol=1e-4):
    for x, y in zip(a, b):
        assert len(x) == len(y)
        assert torch.allclose(x.logits, y.logits, atol=atol * max(1.0, float(y.logits.abs().max())))
        assert torch.allclose(x.points, y.points) and torch.allclose(x.iou, y.iou, atol=1e-5)


def test_hierarchical_without_confident_masks_is_the_grid():
    model = make_teacher(0)
    images, input_hw, orig_hw = _inputs()
    grid = generate_everything(model, images, input_hw, orig_hw, **KWARGS)
    hier = generate_everything(
        model, images, input_hw, orig_hw, strategy="hierarchical",
        hierarchical_logit_thresh=float("inf"), **KWARGS,
    )  # fmt: skip
    assert [o.decoded_prompts for o in grid] == [o.decoded_prompts for o in hier] == [64, 64]
    assert sum(len(o) for o in grid) > 0
    _same_outputs(hier, grid)


def test_hierarchical_decodes_fewer_prompts_when_masks_are_confident():
    """With NMS off, the hierarchical masks are the grid's masks of the prompts it decoded."""
    model = make_teacher(0)
    images, input_hw, orig_hw = _inputs()
    no_nms = {**KWARGS, "box_nms_thresh": 1.0}
    grid = generate_everything(model, images, input_hw, orig_hw, **no_nms)
    hier = generate_everything(
        model, images, input_hw, orig_hw, strategy="hierarchical", hierarchical_logit_thresh=0.0,
        **no_nms,
    )  # fmt: skip
    assert all(o.decoded_prompts < 64 for o in hier) and sum(len(o) for o in hier) > 0
    for g, h in zip(grid, hier):
        for point, logits in zip(h.points, h.logits):
            same = (point[None] == g.points).all(1) & ((g.logits - logits).abs() < 1e-3).all(
                -1
            ).all(-1)
            assert bool(same.any())
    with pytest.raises(ValueError, match="decodes the grid"):
        generate_everything(model, images, input_hw, orig_hw, strategy="hierarchical",
                            points=[torch.zeros(1, 2)] * 2)  # fmt: skip


def test_speed_options_give_the_same_masks():
    """SDPA attention in the ViT encoder: the same masks, to float rounding."""
    model = make_teacher(0)
    with torch.no_grad():  # zero-initialised relative-position tables would hide that term
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    images, input_hw, orig_hw = _inputs()
    want = generate_everything(model, images, input_hw, orig_hw, **KWARGS)
    got = generate_everything(model, images, input_hw, orig_hw, sdpa=True, **KWARGS)
    _same_outputs(got, want)


@pytest.mark.slow  # the one-time compile: 30-60 s on a CPU
def test_compiled_decoder_gives_the_same_masks():
    model = make_teacher(0)
    images, input_hw, orig_hw = _inputs(1)
    kwargs = {**KWARGS, "points_per_batch": 32}  # 64 prompts: one chunk shape, one compile
    want = generate_everything(model, images, input_hw, orig_hw, **kwargs)
    got = generate_everything(model, images, input_hw, orig_hw, compile=True, **kwargs)
    _same_outputs(got, want)


def test_header_records_the_strategy_not_the_speed_options():
    grid = GenerationParams(sdpa=True, compile=True).header_params()
    assert not {"strategy", "hierarchical_stride", "sdpa", "compile"} & set(grid)
    hier = GenerationParams(strategy="hierarchical", hierarchical_stride=2).header_params()
    assert hier["strategy"] == "hierarchical" and hier["hierarchical_stride"] == 2
    assert hier["hierarchical_logit_thresh"] == 8.5
    with pytest.raises(ValueError, match="strategy 'dense'"):
        GenerationParams(strategy="dense")


def test_a_hierarchical_cache_is_refused_for_grid_and_vice_versa(
    sample_root, teacher_ckpt, tmp_path
):
    """Resuming a cache with another strategy refuses (the header differs); training checks the
    strategy: a grid cache (made before the key existed or after: no key) matches grid only."""
    from maskteacher.config import PrecomputeConfig
    from maskteacher.errors import UserError
    from maskteacher.models.everything import GenerationParams
    from maskteacher.train.data.teacher_cache import TeacherIdentity, check_cache_identity

    hier = {"strategy": "hierarchical", "hierarchical_logit_thresh": 0.0}
    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt, precompute=hier)
    assert run_cli(config, "--limit", "2") == 0
    header = load_header(str(tmp_path / "cache"))
    assert header.params["strategy"] == "hierarchical"
    grid_again = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    assert run_cli(grid_again, "--limit", "3") == 2  # params differ: refused, nothing written

    def identity(**precompute):
        generation = GenerationParams.from_config(PrecomputeConfig(**precompute))
        return TeacherIdentity(
            "mask_teacher.cache_path", "vit_b_tiny", "mask_teacher.teacher_type",
            str(teacher_ckpt), "mask_teacher.checkpoint_path", IMAGE_SIZE, generation,
        )  # fmt: skip

    gen = {k: v for k, v in GEN.items() if k != "store"}
    check_cache_identity(str(tmp_path / "cache"), identity(**gen, **hier))
    with pytest.raises(
        UserError,
        match="strategy = 'hierarchical', but the config has precompute.strategy = 'grid'",
    ):
        check_cache_identity(str(tmp_path / "cache"), identity(**gen))
    with pytest.raises(UserError, match="hierarchical_logit_thresh = 0.0"):
        check_cache_identity(str(tmp_path / "cache"), identity(**gen, strategy="hierarchical"))
