"""Registry: every entry builds, runs at a small image_size, round-trips, and works with SAM tools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import ImageEncoderViT, Sam

from maskteacher.errors import UserError
from maskteacher.models import (
    HQ_TYPES,
    MODEL_TYPES,
    OFFICIAL_TYPES,
    SAM_TYPES,
    build_sam,
    export_official,
    read_state_dict,
)
from maskteacher.models.tiny_vit import TinyViT

# (model type, decoder width, encoder class)
ENTRIES = {
    "vit_h": (256, ImageEncoderViT),
    "vit_l": (256, ImageEncoderViT),
    "vit_b": (256, ImageEncoderViT),
    "vit_t": (256, TinyViT),
    "vit_t_tiny": (64, TinyViT),
    "vit_b_tiny": (64, ImageEncoderViT),
}


def test_model_types_lists_the_registry():
    assert SAM_TYPES == ("vit_h", "vit_l", "vit_b", "vit_t", "vit_t_tiny", "vit_b_tiny")
    assert tuple(f"{t}_hq" for t in SAM_TYPES) == HQ_TYPES
    assert MODEL_TYPES == SAM_TYPES + HQ_TYPES
    assert set(OFFICIAL_TYPES) == {"vit_h", "vit_l", "vit_b", "vit_t"}


@pytest.mark.parametrize(
    "model_type",
    [pytest.param(t, marks=pytest.mark.slow) if t == "vit_h" else t for t in SAM_TYPES],
)
def test_entry_builds_runs_and_round_trips(model_type, randomize, tmp_path):
    """Build at image_size 64, run encoder + prompt encoder + decoder, save -> load exactly.

    vit_h is the expensive one (20-30 s on 2 cores, ~5 GB RSS: 632M parameters, a 2.5 GB file).
    """
    size, grid, low = 64, 4, 16
    dim, encoder_class = ENTRIES[model_type]
    model = build_sam(model_type, image_size=size)
    assert isinstance(model, Sam) and isinstance(model.image_encoder, encoder_class)
    assert not model.training
    assert (model.model_type, model.image_size, model.image_encoder.img_size) == (
        model_type,
        size,
        size,
    )
    assert (model.embedding_size, model.low_res_size) == (grid, low)
    assert model.prompt_encoder.image_embedding_size == (grid, grid)
    assert model.prompt_encoder.input_image_size == (size, size)

    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, size, size))
        points = torch.tensor([[[10.0, 20.0], [40.0, 5.0]]])  # (1 prompt, 2 points, xy)
        sparse, dense = model.prompt_encoder(
            points=(points, torch.tensor([[1, 0]])), boxes=None, masks=None
        )
        masks, iou = model.mask_decoder(
            image_embeddings=emb,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    assert emb.shape == (1, dim, grid, grid)
    assert sparse.shape == (1, 3, dim) and dense.shape == (1, dim, grid, grid)
    assert masks.shape == (1, 3, low, low) and iou.shape == (1, 3)
    assert torch.isfinite(masks).all() and torch.isfinite(iou).all()

    state = randomize(model, seed=1)
    path = tmp_path / f"{model_type}.pth"
    export_official(model, path)
    _assert_same_tensors(read_state_dict(path), state)  # the file holds exactly the model
    del model, state  # keep one copy of the big models in memory, not two
    loaded = build_sam(model_type, path, image_size=size)
    _assert_same_tensors(loaded.state_dict(), read_state_dict(path))  # ... and loads exactly


def _assert_same_tensors(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_image_size_sets_encoder_and_prompt_encoder_geometry():
    model = build_sam("vit_b_tiny", image_size=128)
    assert model.image_encoder.pos_embed.shape == (1, 8, 8, 64)
    assert model.prompt_encoder.image_embedding_size == (8, 8)
    assert model.prompt_encoder.input_image_size == (128, 128)
    assert model.prompt_encoder.get_dense_pe().shape == (1, 64, 8, 8)
    tiny_vit = build_sam("vit_t_tiny", image_size=256)
    with torch.no_grad():
        assert tiny_vit.image_encoder(torch.zeros(2, 3, 256, 256)).shape == (2, 64, 16, 16)


@pytest.mark.parametrize(
    ("model_type", "image_size", "message"),
    [
        ("vit_x", 64, "unknown model type 'vit_x'; expected one of vit_h, vit_l, vit_b, vit_t,"),
        ("vit_b_tiny", 100, "image_size must be a multiple of 16, got 100"),
        ("vit_b_tiny", 0, "image_size must be a positive integer, got 0"),
    ],
)
def test_build_sam_rejects_bad_arguments(model_type, image_size, message):
    with pytest.raises(UserError) as info:
        build_sam(model_type, image_size=image_size)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model_type", ["vit_t_tiny", "vit_b_tiny"])
def test_segment_anything_predictor_runs_on_registry_model(model_type):
    model = build_sam(model_type, image_size=64)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, 48, 80) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 16, 16)
    assert predictor.get_image_embedding().shape == (1, 64, 4, 4)


@pytest.mark.parametrize("model_type", ["vit_t_tiny", "vit_b_tiny"])
def test_segment_anything_automatic_mask_generator_runs_on_registry_model(model_type):
    model = build_sam(model_type, image_size=64)
    image = np.random.default_rng(1).integers(0, 256, size=(40, 64, 3), dtype=np.uint8)
    generator = SamAutomaticMaskGenerator(
        model,
        points_per_side=4,
        points_per_batch=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    records = generator.generate(image)
    assert len(records) >= 1  # no quality filtering: NMS always keeps at least one mask
    for record in records:
        assert record["segmentation"].shape == (40, 64)
        assert len(record["point_coords"]) == 1
