"""Point-sampled decoding in the train step (``train.point_decoding`` with ``train.loss_points``):
the same logits, losses, gradients and loss curves as decoding full maps."""

from __future__ import annotations

import math

import pytest
import torch
from golden_trace import trace

from maskteacher.models import build_sam
from maskteacher.train.data.batch import PromptSet, TrainSample, collate
from maskteacher.train.engine import compute_loss
from maskteacher.train.schedule import EpochSettings
from maskteacher.train.student import StudentForward, run_forward, use_point_decoding
from maskteacher.train.supervision.base import StepContext
from maskteacher.train.supervision.criterion import MaskCriterion
from maskteacher.train.supervision.gt import GTSupervision, SingleSupervision
from maskteacher.train.supervision.matcher import MatchSettings

S = 64
WEIGHTS = {"bce": 1.0, "focal": 5.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


def _model(seed: int = 0, model_type: str = "vit_t_tiny"):
    torch.manual_seed(seed)
    sam = build_sam(model_type, image_size=S)
    with torch.no_grad():  # blob-sized logits, so that matching finds pairs
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(300.0)
    return sam


def _batch(seed: int, *, prompts: int = 6, single: bool = False):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(2):
        yy, xx = torch.meshgrid(torch.arange(S // 4), torch.arange(S // 4), indexing="ij")
        centres = torch.rand(4, 2, generator=gen) * (S // 4)
        gt = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) < 20
        points = torch.rand(prompts, 2, generator=gen) * S
        prompt_set = PromptSet.from_points(points)
        if single:  # several points, or a box, each drawn from an object
            labels = torch.tensor([[1, 1], [1, -1], [-1, -1]] * (prompts // 3))
            prompt_set = PromptSet(
                points=torch.rand(prompts, 2, 2, generator=gen) * S,
                labels=labels,
                boxes=torch.tensor([[4.0, 4, 40, 40]]).repeat(prompts, 1),
                has_box=(labels == -1).all(dim=1),
                target=torch.arange(prompts) % 4,
            )
        image = torch.randint(0, 255, (3, S, S), dtype=torch.uint8, generator=gen)
        samples.append(
            TrainSample(
                image_id=str(i),
                image=image,
                input_hw=(S, S),
                orig_hw=(S, S),
                gt_masks=gt,
                prompts=prompt_set,
            )  # fmt: skip
        )
    return collate(samples)


def _ctx(step: int = 0) -> StepContext:
    return StepContext(
        settings=EpochSettings(WEIGHTS, False, 1.0, (True, True, True)),
        generator=torch.Generator().manual_seed(step),
        reduce_count=float,
        image_size=S,
    )


@pytest.mark.parametrize("multimask,chunk,ckpt", [(False, 256, False), (True, 5, True)])
def test_no_grad_logits_equal_dense_and_the_head_decodes_them(multimask, chunk, ckpt):
    batch = _batch(0)
    sam = _model(1)
    kwargs = dict(multimask_output=multimask, points_per_batch=chunk, checkpoint_decoder=ckpt)
    dense = run_forward(StudentForward(sam, **kwargs), batch)
    sampled = run_forward(StudentForward(sam, point_decoding=True, **kwargs), batch)
    assert not sampled.logits.requires_grad and sampled.point_head is not None
    assert torch.equal(sampled.logits, dense.logits.detach())
    assert torch.equal(sampled.iou_pred, dense.iou_pred)
    k = dense.masks_per_prompt
    rows = torch.tensor([0, 3, 2 * k + 1, 12 * k - 1])
    pixels = torch.randint((S // 4) ** 2, (4, 40), generator=torch.Generator().manual_seed(2))
    want = dense.logits.flatten(0, 1).flatten(1)[rows].gather(1, pixels)
    got = sampled.point_head.logits_at(rows, pixels)
    assert float((got - want).detach().abs().max()) <= 1e-5 * max(
        1.0, float(want.detach().abs().max())
    )


def _loss_and_grads(strategy, batch, *, point: bool, ckpt: bool = False, multimask=False):
    sam = _model(3)
    forward = StudentForward(
        sam, point_decoding=point, checkpoint_decoder=ckpt, multimask_output=multimask
    )
    result = compute_loss(forward, batch, strategy=strategy, aux_losses=[], ctx=_ctx(), bf16=False)
    result.total.backward()
    grads = {n: p.grad for n, p in sam.named_parameters() if p.grad is not None}
    return result, grads


@pytest.mark.parametrize("single", [False, True])
def test_losses_and_gradients_equal_dense(single):
    """The whole step (matching on the no-grad masks, losses at the sampled pixels, IoU targets
    on all pixels): every term and every parameter's gradient as with full maps."""
    batch = _batch(4, single=single)
    criterion = MaskCriterion(loss_points=50)
    strategy = (
        SingleSupervision(criterion=criterion)
        if single
        else GTSupervision(criterion=criterion, match=MatchSettings(iou_threshold=0.0))
    )
    dense, dense_grads = _loss_and_grads(strategy, batch, point=False, multimask=single)
    point, point_grads = _loss_and_grads(strategy, batch, point=True, ckpt=True, multimask=single)
    assert dense.stats["matched"] > 0 and dense.stats == point.stats
    for key, value in dense.terms.items():
        assert math.isclose(point.terms[key], value, rel_tol=1e-5, abs_tol=1e-7), key
    assert sorted(point_grads) == sorted(dense_grads)
    # relative per tensor, plus an absolute floor for gradients that are 0 up to rounding (the
    # attention's key bias) at 1e-6 of the largest gradient
    scale = max(float(g.abs().max()) for g in dense_grads.values())
    for name, grad in dense_grads.items():
        diff = float((point_grads[name] - grad).abs().max())
        assert diff <= 1e-5 * float(grad.abs().max()) + 1e-6 * scale, name


def test_a_loss_on_all_pixels_refuses_point_decoding():
    batch = _batch(5)
    strategy = GTSupervision(criterion=MaskCriterion(), match=MatchSettings(iou_threshold=0.0))
    with pytest.raises(RuntimeError, match="sampled pixels only"):
        _loss_and_grads(strategy, batch, point=True)


def test_point_decoding_only_when_losses_sample_fewer_pixels():
    assert use_point_decoding(True, 64, 64)  # 64 of 16 x 16 = 256 pixels
    assert not use_point_decoding(True, 256, 64)
    assert not use_point_decoding(True, None, 1024)
    assert not use_point_decoding(False, 64, 1024)


def test_training_curves_equal_dense():
    """Same seed, same data, 2 epochs: per-step losses, logged terms and matched IoU of runs
    with point-sampled decoding equal those of full maps to float tolerance (dual kl, replace_gt
    on soft targets, single mode with boxes and multimask output, decoder distillation)."""
    runs = ["dual_kl_points", "replace_gt_soft", "single_mixed", "kd_decoder"]
    got = {}
    for point in (False, True):
        update = {"train": {"loss_points": 64, "point_decoding": point}}
        got[point] = trace(only=runs, update=update)["runs"]
    for name in runs:
        dense, point = got[False][name], got[True][name]
        assert sorted(dense["scalars"]) == sorted(point["scalars"])
        pairs = [("losses", dense["losses"], point["losses"])]
        pairs += [(tag, vals, point["scalars"][tag]) for tag, vals in dense["scalars"].items()]
        for what, want, have in pairs:
            for a, b in zip(want, have):
                x, y = float.fromhex(a), float.fromhex(b)
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (name, what, x, y)


def test_the_distillation_blocks_features_turn_point_decoding_off():
    """The prompt-dependent distillation blocks read every prompt's dense logits, mask tokens
    and prompt-conditioned embedding with gradients: asking for them turns point decoding off,
    and the dense logits are those of the plain decoder."""
    sam = _model()
    batch = _batch(3)
    plain = StudentForward(sam, multimask_output=True, points_per_batch=4, point_decoding=False)
    both = StudentForward(
        sam, multimask_output=True, points_per_batch=4, point_decoding=True, return_features=True
    )
    assert not both.point_decoding
    ref = run_forward(plain, batch)
    got = run_forward(both, batch)
    assert got.point_head is None and got.logits.requires_grad
    assert got.mask_tokens.shape[:2] == (ref.logits.shape[0], 4)
    assert got.image_tokens.shape[0] == ref.logits.shape[0]
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
