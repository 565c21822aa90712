"""Batched student decoding against segment-anything's own per-image decoder."""

from __future__ import annotations

import torch

from maskteacher.models import build_sam
from maskteacher.train.student import StudentForward, decode_prompts

S = 64


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_sam("vit_b_tiny", image_size=S)


def _official(sam, emb, *, points=None, labels=None, boxes=None, multimask):
    """segment-anything's MaskDecoder, one prompt at a time, one image at a time."""
    pts = None if points is None else (points, labels)
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def test_decode_prompts_matches_official_decoder():
    sam = _model()
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 64, S // 16, S // 16, generator=gen)
    points = torch.rand(5, 3, 2, generator=gen) * S
    labels = torch.tensor([[1, 0, -1], [1, 1, 1], [1, -1, -1], [0, 1, -1], [1, 1, -1]])
    boxes = torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 60.0, 50.0]])
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        for multimask in (False, True):
            out = decode_prompts(
                sam, emb, points=points, labels=labels, boxes=None, image_index=index,
                multimask_output=multimask, return_tokens=True,
            )  # fmt: skip
            k = 3 if multimask else 1
            assert out.low_res_logits.shape == (5, k, S // 4, S // 4)
            assert out.tokens.shape == (5, k, 64)
            for p in range(5):
                i = int(index[p])
                ref_masks, ref_iou = _official(
                    sam, emb[i : i + 1], points=points[p : p + 1], labels=labels[p : p + 1],
                    multimask=multimask,
                )  # fmt: skip
                torch.testing.assert_close(
                    out.low_res_logits[p], ref_masks[0], atol=1e-4, rtol=1e-4
                )
                torch.testing.assert_close(out.iou_pred[p], ref_iou[0], atol=1e-5, rtol=1e-5)
            box_out = decode_prompts(
                sam, emb, points=None, labels=None, boxes=boxes, image_index=torch.tensor([1, 0]),
                multimask_output=multimask,
            )  # fmt: skip
            for p, i in enumerate([1, 0]):
                ref_masks, _ = _official(
                    sam, emb[i : i + 1], boxes=boxes[p : p + 1], multimask=multimask
                )
                torch.testing.assert_close(
                    box_out.low_res_logits[p], ref_masks[0], atol=1e-4, rtol=1e-4
                )


def _batch_inputs(gen, n=7):
    images = torch.randint(0, 255, (2, 3, S, S), dtype=torch.uint8, generator=gen)
    input_hw = torch.tensor([[S, S], [48, S]])
    points = torch.rand(n, 1, 2, generator=gen) * 48
    labels = torch.ones(n, 1, dtype=torch.long)
    has_box = torch.zeros(n, dtype=torch.bool)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1][:n])
    return images, input_hw, points, labels, has_box, index


def test_chunked_decoding_equals_one_call_and_checkpointing_keeps_gradients():
    gen = torch.Generator().manual_seed(2)
    images, input_hw, points, labels, has_box, index = _batch_inputs(gen)
    grads = []
    outputs = []
    for chunk, ckpt in ((256, False), (3, False), (3, True)):
        sam = _model(seed=3)
        fwd = StudentForward(sam, points_per_batch=chunk, checkpoint_decoder=ckpt)
        emb, logits, iou, tokens = fwd(images, input_hw, points, labels, None, has_box, index)
        assert tokens is None and logits.shape == (7, 1, S // 4, S // 4)
        (logits.square().mean() + iou.sum()).backward()
        outputs.append(logits.detach())
        grads.append(sam.mask_decoder.output_upscaling[0].weight.grad.clone())
    for out, grad in zip(outputs[1:], grads[1:]):
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-5, rtol=1e-4)


def test_mixed_boxes_and_points_keep_prompt_order():
    sam = _model(seed=4)
    gen = torch.Generator().manual_seed(5)
    images, input_hw, points, labels, _, index = _batch_inputs(gen, n=4)
    index = torch.tensor([0, 1, 0, 1])
    points = torch.cat([points, torch.rand(4, 1, 2, generator=gen) * 40], dim=1)
    labels = torch.tensor([[1, 1], [-1, -1], [1, -1], [-1, -1]])
    has_box = torch.tensor([False, True, False, True])
    boxes = torch.tensor([[0.0, 0, 0, 0], [5, 5, 30, 30], [0, 0, 0, 0], [1, 2, 40, 44]])
    fwd = StudentForward(sam, multimask_output=True, return_tokens=True)
    with torch.no_grad():
        emb, logits, iou, tokens = fwd(images, input_hw, points, labels, boxes, has_box, index)
        assert logits.shape == (4, 3, S // 4, S // 4) and tokens.shape == (4, 3, 64)
        for p in range(4):
            i = int(index[p])
            if has_box[p]:
                ref, _ = _official(sam, emb[i : i + 1], boxes=boxes[p : p + 1], multimask=True)
            else:
                ref, _ = _official(
                    sam, emb[i : i + 1], points=points[p : p + 1], labels=labels[p : p + 1],
                    multimask=True,
                )  # fmt: skip
            torch.testing.assert_close(logits[p], ref[0], atol=1e-4, rtol=1e-4)


def test_step_without_prompts_still_backpropagates():
    """A batch whose images have no prompt at all gives a zero loss that backward accepts."""
    from maskteacher.train.data.batch import PromptSet, TrainSample, collate
    from maskteacher.train.engine import compute_loss
    from maskteacher.train.schedule import EpochSettings
    from maskteacher.train.supervision.base import StepContext
    from maskteacher.train.supervision.criterion import MaskCriterion
    from maskteacher.train.supervision.gt import GTSupervision
    from maskteacher.train.supervision.matcher import MatchSettings

    sam = _model(seed=6)
    sample = TrainSample(
        image_id="x",
        image=torch.zeros(3, S, S, dtype=torch.uint8),
        input_hw=(S, S),
        orig_hw=(S, S),
        gt_masks=torch.zeros(0, S // 4, S // 4, dtype=torch.bool),
        prompts=PromptSet.from_points(torch.zeros(0, 2)),
    )
    batch = collate([sample, sample])
    weights = {"bce": 1.0, "focal": 1.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
    ctx = StepContext(
        settings=EpochSettings(weights, False, 1.0, (True, True, True)),
        generator=torch.Generator(),
        reduce_count=float,
        image_size=S,
    )
    strategy = GTSupervision(criterion=MaskCriterion(), match=MatchSettings())
    result = compute_loss(
        StudentForward(sam), batch, strategy=strategy, aux_losses=[], ctx=ctx, bf16=False
    )
    assert float(result.total.detach()) == 0.0 and result.stats["matched"] == 0.0
    result.total.backward()
    assert sam.mask_decoder.iou_token.weight.grad is not None
