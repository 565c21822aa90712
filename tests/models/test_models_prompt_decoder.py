"""A teacher's prompt encoder + mask decoder alone, and decoding any prompts with the decoder's
features: equal to segment-anything's MaskDecoder.forward image by image, with points (padded
with -1) and boxes, the image encoder never built."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from maskteacher.errors import UserError
from maskteacher.models import build_sam
from maskteacher.models.prompt_decoder import (
    build_prompt_decoder,
    decoder_state,
    load_prompt_decoder,
)
from maskteacher.models.prompt_features import decode_features, decode_prompt_batch
from maskteacher.models.tiny_vit import TinyViT

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam("vit_b_tiny", image_size=SIZE)


def reference(model, emb, points, labels, box, multimask):
    """segment-anything's decoder for one prompt of one image (its own forward)."""
    pts = None if points is None else (points[None], labels[None])
    sparse, dense = model.prompt_encoder(points=pts, boxes=box, masks=None)
    masks, iou = model.mask_decoder(
        image_embeddings=emb[None],
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    return masks[0], iou[0]


@pytest.mark.parametrize("multimask", [False, True])
def test_batch_of_points_and_boxes_equals_mask_decoder(model, multimask):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 64, SIZE // 16, SIZE // 16, generator=g)
    points = torch.rand(5, 3, 2, generator=g) * SIZE
    labels = torch.tensor([[1, 1, -1], [1, 0, 1], [-1, -1, -1], [1, -1, -1], [-1, -1, -1]])
    has_box = torch.tensor([False, False, True, False, True])
    boxes = torch.tensor(
        [[0, 0, 0, 0], [0, 0, 0, 0], [4, 8, 40, 30], [0, 0, 0, 0], [10, 2, 60, 60.0]]
    )
    image = torch.tensor([0, 1, 1, 0, 0])
    with torch.no_grad():
        out = decode_prompt_batch(
            model, emb, points=points, labels=labels, boxes=boxes, has_box=has_box,
            prompt_image=image, multimask_output=multimask, chunk=2,
        )  # fmt: skip
        for p in range(5):  # the same padded point set (label -1: not a point) or the box
            box = boxes[p : p + 1] if has_box[p] else None
            pts = None if has_box[p] else points[p]
            masks, iou = reference(model, emb[image[p]], pts, labels[p], box, multimask)
            torch.testing.assert_close(out.low_res_logits[p], masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.iou_pred[p], iou, atol=1e-5, rtol=1e-5)
    k = 3 if multimask else 1
    assert out.low_res_logits.shape == (5, k, SIZE // 4, SIZE // 4)
    assert out.mask_tokens.shape == (5, 4, 64) and out.tokens.shape == (5, k, 64)
    assert out.image_tokens.shape == (5, 64, SIZE // 16, SIZE // 16)
    sel = slice(1, 4) if multimask else slice(0, 1)
    assert torch.equal(out.tokens, out.mask_tokens[:, sel])


def test_no_prompt_gives_empty_outputs(model):
    emb = torch.randn(1, 64, 4, 4)
    out = decode_prompt_batch(
        model, emb, points=torch.zeros(0, 1, 2), labels=torch.zeros(0, 1, dtype=torch.long),
        boxes=None, has_box=torch.zeros(0, dtype=torch.bool),
        prompt_image=torch.zeros(0, dtype=torch.long), multimask_output=False,
    )  # fmt: skip
    assert out.low_res_logits.shape == (0, 1, 16, 16) and out.image_tokens.shape[0] == 0


def test_prompt_decoder_builds_no_image_encoder(monkeypatch, model):
    def refuse(self, *args, **kwargs):
        raise AssertionError("image encoder built")

    monkeypatch.setattr(ImageEncoderViT, "__init__", refuse)
    monkeypatch.setattr(TinyViT, "__init__", refuse)
    for kind in ("vit_b_tiny", "vit_t_tiny", "vit_h", "vit_b_tiny_hq"):
        decoder = build_prompt_decoder(kind, SIZE)
        assert decoder.image_size == SIZE and not hasattr(decoder, "image_encoder")
    loaded = load_prompt_decoder("vit_b_tiny", SIZE, model.state_dict(), source="m")
    state = decoder_state(model.state_dict())
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    emb = torch.randn(2, 64, 4, 4)
    args = dict(points=torch.rand(3, 1, 2) * SIZE, labels=torch.ones(3, 1, dtype=torch.long),
                boxes=None, image_index=torch.tensor([0, 1, 1]), multimask_output=True)  # fmt: skip
    with torch.no_grad():
        a, b = decode_features(model, emb, **args), decode_features(loaded, emb, **args)
    assert torch.equal(a.low_res_logits, b.low_res_logits)
    assert torch.equal(a.image_tokens, b.image_tokens)


def test_loading_the_wrong_decoder_is_one_line(model):
    with pytest.raises(UserError) as info:
        load_prompt_decoder("vit_h", SIZE, model.state_dict(), source="teacher_decoder.npz")
    message = str(info.value)
    assert (
        "\n" not in message and "teacher_decoder.npz" in message and "of another shape" in message
    )
    with pytest.raises(UserError, match="missing"):
        load_prompt_decoder("vit_b_tiny", SIZE, {}, source="empty")


def test_sam_hq_decoder_gives_its_tokens_not_its_masks():
    torch.manual_seed(0)
    hq = build_sam("vit_b_tiny_hq", image_size=SIZE)
    loaded = load_prompt_decoder("vit_b_tiny_hq", SIZE, hq.state_dict(), source="hq")
    out = decode_features(
        loaded, torch.randn(1, 64, 4, 4), points=torch.rand(2, 1, 2) * SIZE,
        labels=torch.ones(2, 1, dtype=torch.long), boxes=None,
        image_index=torch.zeros(2, dtype=torch.long), multimask_output=True,
    )  # fmt: skip
    assert out.mask_tokens.shape == (2, 5, 64)  # SAM's four, then the HQ token
    assert out.low_res_logits is None and out.tokens is None
