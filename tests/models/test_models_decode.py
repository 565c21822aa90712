"""preprocess and decode_points agree with segment-anything's own Sam.preprocess / MaskDecoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskteacher.models import build_sam, decode_points, preprocess

TINY = ["vit_t_tiny", "vit_b_tiny"]


@pytest.fixture(params=TINY)
def model(request, randomize):
    model = build_sam(request.param, image_size=64)
    randomize(model, seed=2)
    return model


def _reference_decode(model, embedding, points, multimask):
    """segment-anything's path for one image: prompt encoder + MaskDecoder.forward."""
    labels = torch.ones(points.shape[0], 1, dtype=torch.int64)
    sparse, dense = model.prompt_encoder(
        points=(points[:, None, :], labels), boxes=None, masks=None
    )
    captured = {}
    hook = model.mask_decoder.transformer.register_forward_hook(
        lambda module, args, output: captured.update(hs=output[0])
    )
    try:
        masks, iou = model.mask_decoder(
            image_embeddings=embedding[None],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    finally:
        hook.remove()
    token_slice = slice(2, 5) if multimask else slice(1, 2)  # hs[:, 0] is the IoU token
    return masks, iou, captured["hs"][:, token_slice]


@pytest.mark.parametrize("multimask", [True, False])
def test_decode_points_equals_mask_decoder_for_one_image(model, multimask):
    torch.manual_seed(0)
    embedding = torch.randn(1, model.mask_decoder.transformer_dim, 4, 4)
    points = torch.rand(16, 2) * 64
    with torch.no_grad():
        out = decode_points(
            model, embedding, points, multimask_output=multimask, return_tokens=True
        )
        masks, iou, tokens = _reference_decode(model, embedding[0], points, multimask)
    k = 3 if multimask else 1
    dim = model.mask_decoder.transformer_dim
    assert out.low_res_logits.shape == (16, k, 16, 16) and out.iou_pred.shape == (16, k)
    assert out.tokens.shape == (16, k, dim)
    torch.testing.assert_close(out.low_res_logits, masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iou_pred, iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-5)
    assert decode_points(model, embedding, points, multimask_output=multimask).tokens is None


def test_batched_decode_equals_per_image_calls(model):
    torch.manual_seed(1)
    embeddings = torch.randn(3, model.mask_decoder.transformer_dim, 4, 4)
    points = torch.rand(10, 2) * 64
    image_index = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        batched = decode_points(
            model,
            embeddings,
            points,
            image_index=image_index,
            multimask_output=True,
            return_tokens=True,
        )
        for b in range(3):
            rows = (image_index == b).nonzero().squeeze(1)
            single = decode_points(
                model,
                embeddings[b : b + 1],
                points[rows],
                multimask_output=True,
                return_tokens=True,
            )
            torch.testing.assert_close(
                batched.low_res_logits[rows], single.low_res_logits, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                batched.iou_pred[rows], single.iou_pred, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(batched.tokens[rows], single.tokens, atol=1e-5, rtol=1e-5)


def test_decode_points_trains_end_to_end(model):
    embeddings = torch.randn(2, model.mask_decoder.transformer_dim, 4, 4, requires_grad=True)
    out = decode_points(
        model,
        embeddings,
        torch.rand(4, 2) * 64,
        image_index=torch.tensor([0, 1, 1, 0]),
        multimask_output=False,
    )
    (out.low_res_logits.mean() + out.iou_pred.mean()).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert model.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad is not None
    assert model.mask_decoder.iou_prediction_head.layers[0].weight.grad is not None


def test_decode_points_edge_cases(model):
    embeddings = torch.randn(2, model.mask_decoder.transformer_dim, 4, 4)
    empty = decode_points(
        model,
        embeddings,
        torch.zeros(0, 2),
        image_index=torch.zeros(0, dtype=torch.long),
        multimask_output=True,
        return_tokens=True,
    )
    dim = model.mask_decoder.transformer_dim
    assert empty.low_res_logits.shape == (0, 3, 16, 16) and empty.iou_pred.shape == (0, 3)
    assert empty.tokens.shape == (0, 3, dim)
    with pytest.raises(ValueError, match="image_index is required with 2 image embeddings"):
        decode_points(model, embeddings, torch.zeros(1, 2), multimask_output=True)
    with pytest.raises(ValueError, match=r"points must be \(P, 2\)"):
        decode_points(model, embeddings[:1], torch.zeros(1, 1, 2), multimask_output=True)


@pytest.mark.parametrize("hw", [(64, 64), (64, 37), (21, 64), (1, 5)])
def test_preprocess_equals_sam_preprocess_of_the_unpadded_image(hw):
    model = build_sam("vit_t_tiny", image_size=64)
    h, w = hw
    gen = torch.Generator().manual_seed(h * 100 + w)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    other = torch.randint(0, 256, (3, 50, 64), dtype=torch.uint8, generator=gen)
    batch = torch.stack([F.pad(image, (0, 64 - w, 0, 64 - h)), F.pad(other, (0, 0, 0, 14))])
    out = preprocess(model, batch, torch.tensor([[h, w], [50, 64]]))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert torch.equal(out[0], model.preprocess(image[None])[0])
    assert torch.equal(out[1], model.preprocess(other[None])[0])


def test_preprocess_checks_shapes():
    model = build_sam("vit_t_tiny", image_size=64)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\)"):
        preprocess(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([[32, 32]]))
    with pytest.raises(ValueError, match=r"input_hw must be \(1, 2\)"):
        preprocess(model, torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.tensor([64, 64]))


@pytest.mark.parametrize("bf16", [False, True])
def test_point_prompt_embeddings_equal_the_prompt_encoder(model, bf16):
    from maskteacher.models.decode import point_prompt_embeddings

    points = torch.rand(12, 2) * 64
    labels = torch.ones(12, 1, dtype=torch.int64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sparse, dense = point_prompt_embeddings(model.prompt_encoder, points)
        ref_sparse, ref_dense = model.prompt_encoder(
            points=(points[:, None, :], labels), boxes=None, masks=None
        )
    assert sparse.dtype == ref_sparse.dtype and sparse.shape == ref_sparse.shape
    assert torch.equal(sparse, ref_sparse)  # the same arithmetic, bit for bit
    assert torch.equal(dense.expand_as(ref_dense), ref_dense)


def test_decode_points_traces_without_graph_breaks(model):
    """torch.compile sees decode_points as one graph (segment-anything's prompt encoder alone
    breaks it 7 times on label-masked in-place updates)."""
    import torch._dynamo

    embedding = torch.randn(2, model.mask_decoder.transformer_dim, 4, 4)
    points = torch.rand(10, 2) * 64
    index = torch.tensor([0] * 5 + [1] * 5)

    def run(embedding, points, index):
        out = decode_points(model, embedding, points, image_index=index, multimask_output=False)
        return out.low_res_logits.sum() + out.iou_pred.sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(run)(embedding, points, index)
    assert explained.graph_break_count == 0, explained.break_reasons
