"""generate_everything (maskteacher/models/everything.py) against segment-anything's own
SamAutomaticMaskGenerator, plus its batching, prompts, frames and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from precompute_helpers import IMAGE_SIZE, agreement, make_teacher, our_masks, reference_masks
from segment_anything import SamAutomaticMaskGenerator
from torchvision.ops import box_iou

import maskteacher.models.features as features
from maskteacher.data import generate_sample, point_grid, to_model_input
from maskteacher.models import DecoderOutput, build_sam
from maskteacher.models.everything import (
    generate_everything,
    lowres_boxes_to_original,
    lowres_to_masks,
    valid_lowres_mask,
)

# ------------------------------------------------------------------- real tiny random teacher


def test_agrees_with_sam_automatic_mask_generator_on_a_random_teacher():
    """The tiny random teacher: >= 90 % of the reference's masks have one of ours at IoU >= 0.9
    in the original frame, and vice versa. Random weights give image-wide masks whose boxes
    coincide, so box NMS would leave one mask: NMS is off here (box_nms_thresh 1.0; the
    synthetic test below covers it), pred_iou_thresh is set per image so that ~40 masks survive."""
    model = make_teacher(0)
    base = {
        "points_per_side": 12,
        "points_per_batch": 64,
        "stability_score_thresh": 0.5,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 1.0,
    }
    for sample in generate_sample(2, seed=3, size_range=(90, 150)):
        image = sample.image
        # calibrate: midway between the 40th and 41st best predicted IoU of the stable masks
        x, hw = to_model_input(image, IMAGE_SIZE)
        pool = generate_everything(
            model, x[None], [hw], [image.shape[:2]], pred_iou_thresh=0.0, **base
        )[0]
        top = torch.sort(pool.iou, descending=True).values
        assert len(top) > 41
        thresh = float(top[39] + top[40]) / 2
        kwargs = {**base, "pred_iou_thresh": thresh}
        ref = reference_masks(SamAutomaticMaskGenerator(model, crop_n_layers=0, **kwargs), image)
        (ours,) = our_masks(model, [image], **kwargs)
        assert len(ref) >= 20
        ref_found, ours_found = agreement(ref, ours)
        assert ref_found >= 0.9 and ours_found >= 0.9, (len(ref), len(ours), ref_found, ours_found)


# ------------------------------------------------- synthetic decoder: all of SAM's filtering

SYNTH_SIZE = 256  # model input size of the synthetic tests (low-res 64)
SPACING = 40.0  # object centres lie on this grid (input frame pixels)
RADII = (16.0, 28.0, 44.0)  # one object size per multimask output: 4 - 11 low-res pixels


def _hash(cx: torch.Tensor, cy: torch.Tensor, k: float) -> torch.Tensor:
    v = torch.sin(cx * 12.9898 + cy * 78.233 + k * 37.719) * 43758.5453
    return v - torch.floor(v)


def synthetic_decoder(points: torch.Tensor, low_res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disc logits around the grid object nearest each point: (P, 3, L, L) and IoU (P, 3).

    Logits are ``sharpness * (radius - distance)`` at low-res pixel centres, in the whole
    low-res frame (padding included, as a real decoder outputs), with slopes of 2 - 20 logits
    per input pixel; sharpness and predicted IoU
    vary per object so that the IoU (0.88) and stability (0.95) filters both cut, many prompts
    share an object (duplicates for NMS) and objects cross the image's bottom/right edge."""
    pts = points.double()
    centres = torch.round(pts / SPACING) * SPACING
    coords = torch.arange(low_res, dtype=torch.float64) * 4 + 2.0
    dx = coords[None, None, :] - centres[:, 0, None, None]
    dy = coords[None, :, None] - centres[:, 1, None, None]
    dist = torch.sqrt(dx**2 + dy**2)
    logits, ious = [], []
    for k, radius in enumerate(RADII):
        u = _hash(centres[:, 0], centres[:, 1], k)
        sharp = 2.0 + 18.0 * _hash(centres[:, 1], centres[:, 0], k + 7)
        logits.append(sharp[:, None, None] * (radius - dist))
        ious.append(0.8 + 0.2 * u)
    return torch.stack(logits, 1).float(), torch.stack(ious, 1).float()


@pytest.fixture
def synthetic_model(monkeypatch):
    """A tiny model whose mask decoder is replaced by :func:`synthetic_decoder` on both paths."""
    torch.manual_seed(0)
    model = build_sam("vit_b_tiny", image_size=SYNTH_SIZE)
    low = SYNTH_SIZE // 4

    def fake_decode_points(
        m, image_embeddings, points, *, image_index, multimask_output, return_tokens=False, **_
    ):
        logits, iou = synthetic_decoder(points.cpu(), low)
        return DecoderOutput(low_res_logits=logits, iou_pred=iou)

    monkeypatch.setattr(features, "decode_points", fake_decode_points)
    return model


def synthetic_reference(model, **kwargs) -> SamAutomaticMaskGenerator:
    generator = SamAutomaticMaskGenerator(model, crop_n_layers=0, **kwargs)
    predictor = generator.predictor

    def fake_predict_torch(point_coords, point_labels, multimask_output=True, **_):
        low, iou = synthetic_decoder(point_coords[:, 0, :], SYNTH_SIZE // 4)
        masks = model.postprocess_masks(low, predictor.input_size, predictor.original_size)
        return masks, iou, low

    predictor.predict_torch = fake_predict_torch
    return generator


def test_filtering_agrees_with_sam_on_localised_masks(synthetic_model):
    """SAM's default thresholds (IoU 0.88, stability 0.95, NMS 0.7) on disc-shaped masks: the
    real SamAutomaticMaskGenerator filters full-resolution masks, we filter low-res logits."""
    kwargs = {"points_per_side": 20, "points_per_batch": 64}
    images = [
        np.zeros((179, 299, 3), np.uint8),  # input 153 x 256: padding rows, 153 % 4 != 0
        np.zeros((299, 202, 3), np.uint8),  # input 256 x 173: padding columns
    ]
    ours = our_masks(synthetic_model, images, SYNTH_SIZE, **kwargs)
    reference = synthetic_reference(synthetic_model, **kwargs)
    for image, mine in zip(images, ours):
        ref = reference_masks(reference, image)
        assert len(ref) >= 20
        ref_found, ours_found = agreement(ref, mine)
        assert ref_found >= 0.9 and ours_found >= 0.9, (len(ref), len(mine), ref_found, ours_found)


def test_filters_cut_what_they_should(synthetic_model):
    """Each filter removes candidates, NMS removes duplicates of one object, and the survivors
    come out best predicted IoU first with boxes inside the original frame."""
    image = np.zeros((179, 299, 3), np.uint8)
    x, hw = to_model_input(image, SYNTH_SIZE)

    def run(**kwargs):
        defaults = {
            "points_per_side": 16,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            "box_nms_thresh": 1.0,
        }
        return generate_everything(
            synthetic_model, x[None], [hw], [(179, 299)], **{**defaults, **kwargs}
        )[0]

    everything_kept = run()
    assert len(everything_kept) == 16 * 16 * 3
    by_iou = run(pred_iou_thresh=0.88)
    assert 0 < len(by_iou) < len(everything_kept) and (by_iou.iou > 0.88).all()
    by_stability = run(stability_score_thresh=0.95)
    assert 0 < len(by_stability) < len(everything_kept)
    assert (by_stability.stability >= 0.95).all()
    by_nms = run(box_nms_thresh=0.7)
    assert 20 <= len(by_nms) < len(everything_kept) // 5  # duplicates of one object go
    overlap = box_iou(by_nms.boxes, by_nms.boxes).fill_diagonal_(0)
    assert overlap.max() <= 0.7  # no two survivors overlap more than the NMS threshold
    assert torch.all(by_nms.iou[:-1] >= by_nms.iou[1:])
    capped = run(box_nms_thresh=0.7, max_masks_per_image=5)
    assert len(capped) == 5 and torch.equal(capped.iou, by_nms.iou[:5])
    boxes = by_nms.boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 299).all() and (boxes[:, 3] <= 179).all()


def test_padding_does_not_count_for_stability_or_boxes(monkeypatch):
    """Logits that are positive only in the padding give an empty mask (stability 0, box 0),
    and a mask running into the padding gets a box clipped to the image."""
    model = make_teacher(0)
    low = IMAGE_SIZE // 4
    image = np.zeros((90, 150, 3), np.uint8)
    x, hw = to_model_input(image, IMAGE_SIZE)  # (77, 128): valid low-res rows 0..19
    assert hw == (77, 128)

    def fake(m, emb, points, *, image_index, multimask_output, return_tokens=False, **_):
        logits = torch.full((points.shape[0], 3, low, low), -20.0)
        logits[:, 0, 20:, :] = 20.0  # padding only
        logits[:, 1, 10:, 4:8] = 20.0  # rows 10..31: crosses into the padding
        iou = torch.tensor([[0.9, 0.8, 0.7]]).expand(points.shape[0], 3)
        return DecoderOutput(low_res_logits=logits, iou_pred=iou)

    monkeypatch.setattr(features, "decode_points", fake)
    out = generate_everything(
        model,
        x[None],
        [hw],
        [(90, 150)],
        points=[torch.tensor([[10.0, 10.0]])],
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )[0]
    assert out.stability.tolist() == [0.0, 1.0, 0.0]
    assert out.boxes[0].tolist() == [0, 0, 0, 0]
    sx, sy = 150 / 128, 90 / 77
    np.testing.assert_allclose(out.boxes[1].numpy(), [16 * sx, 40 * sy, 32 * sx, 90.0], rtol=1e-6)
    # the returned logits are the decoder's, padding included
    assert out.logits[0, 25, 0] == 20.0


def test_box_mapping_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 31.0, 18.0], [2.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    input_hw = torch.tensor([[75, 128]] * 3)
    orig_hw = torch.tensor([[300, 512]] * 3)  # scale 4 in both axes
    got = lowres_boxes_to_original(boxes, input_hw, orig_hw)
    # last valid row 18 covers input rows 72..75 (75 is padding): clipped to H = 300
    assert got.tolist() == [[0, 0, 512, 300], [32, 48, 48, 64], [0, 0, 0, 0]]


def test_valid_region():
    valid = valid_lowres_mask(torch.tensor([[77, 128], [128, 86]]), 32)
    assert valid[0].sum(0).max() == 20 and valid[0].sum(1).max() == 32
    assert valid[1].sum(0).max() == 32 and valid[1].sum(1).max() == 22


def test_lowres_to_masks_equals_sam_postprocess():
    model = make_teacher(0)
    logits = torch.randn(5, 32, 32) * 3
    got = lowres_to_masks(logits, image_size=IMAGE_SIZE, input_hw=(77, 128), orig_hw=(90, 150))
    want = model.postprocess_masks(logits[:, None], (77, 128), (90, 150))[:, 0] > 0
    assert torch.equal(got, want)


# ------------------------------------------------------------------- batching, prompts, options


def test_batching_across_images_equals_one_image_at_a_time():
    """Prompt chunks that span images give what each image alone gives."""
    model = make_teacher(0)
    samples = generate_sample(3, seed=5, size_range=(70, 130))
    inputs = [to_model_input(s.image, IMAGE_SIZE) for s in samples]
    kwargs = {
        "points_per_side": 5,
        "points_per_batch": 7,
        "pred_iou_thresh": 0.2,
        "box_nms_thresh": 0.9,
    }
    kwargs["stability_score_thresh"] = 0.5
    batched = generate_everything(
        model,
        torch.stack([x for x, _ in inputs]),
        [hw for _, hw in inputs],
        [s.image.shape[:2] for s in samples],
        return_tokens=True,
        return_embedding=True,
        **kwargs,
    )
    for (x, hw), sample, got in zip(inputs, samples, batched):
        (alone,) = generate_everything(
            model,
            x[None],
            [hw],
            [sample.image.shape[:2]],
            return_tokens=True,
            return_embedding=True,
            **kwargs,
        )
        assert len(got) == len(alone) > 0
        for name in ("logits", "points", "iou", "stability", "boxes", "tokens", "embedding"):
            torch.testing.assert_close(
                getattr(got, name), getattr(alone, name), atol=1e-4, rtol=1e-4
            )
        assert got.tokens.shape == (len(got), 64)
        assert got.embedding.shape == (64, IMAGE_SIZE // 16, IMAGE_SIZE // 16)


def test_explicit_points_equal_the_grid():
    model = make_teacher(0)
    sample = generate_sample(1, seed=2)[0]
    x, hw = to_model_input(sample.image, IMAGE_SIZE)
    kwargs = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.5, "box_nms_thresh": 1.0}
    grid = generate_everything(
        model, x[None], [hw], [sample.image.shape[:2]], points_per_side=4, **kwargs
    )[0]
    given = generate_everything(
        model,
        x[None],
        [hw],
        [sample.image.shape[:2]],
        points=[torch.from_numpy(point_grid(4, hw))],
        **kwargs,
    )[0]
    torch.testing.assert_close(grid.logits, given.logits)
    one = generate_everything(
        model,
        x[None],
        [hw],
        [sample.image.shape[:2]],
        points=[torch.tensor([[20.0, 30.0]])],
        **kwargs,
    )[0]
    assert len(one) <= 3 and all(p == [20.0, 30.0] for p in one.points.tolist())


def test_no_prompts_gives_empty_outputs():
    model = make_teacher(0)
    x, hw = to_model_input(np.zeros((64, 64, 3), np.uint8), IMAGE_SIZE)
    (out,) = generate_everything(
        model, x[None], [hw], [(64, 64)], points=[torch.zeros(0, 2)], return_tokens=True
    )
    assert len(out) == 0 and out.logits.shape == (0, 32, 32) and out.tokens.shape == (0, 64)


def test_single_mask_output_and_bf16_and_mode():
    model = make_teacher(0).train()
    sample = generate_sample(1, seed=4)[0]
    x, hw = to_model_input(sample.image, IMAGE_SIZE)
    kwargs = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    single = generate_everything(
        model,
        x[None],
        [hw],
        [sample.image.shape[:2]],
        multimask_output=False,
        box_nms_thresh=1.0,
        **kwargs,
    )[0]
    assert len(single) == 16
    assert model.training  # the caller's mode is restored
    fp32 = generate_everything(
        model, x[None], [hw], [sample.image.shape[:2]], box_nms_thresh=1.0, **kwargs
    )[0]
    bf16 = generate_everything(
        model, x[None], [hw], [sample.image.shape[:2]], box_nms_thresh=1.0, bf16=True, **kwargs
    )[0]
    assert bf16.logits.dtype == torch.float32 and len(bf16) == len(fp32) == 48
    # same masks up to bf16 rounding (the order may differ where predicted IoUs are close)
    diff = (bf16.logits[:, None] - fp32.logits[None]).abs().flatten(2).amax(2)  # (48, 48)
    assert diff.min(dim=1).values.max() < 0.1 * fp32.logits.abs().max()
    assert not bf16.logits.requires_grad
