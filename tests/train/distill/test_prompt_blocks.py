"""The origin's four blocks by hand: each formula on values worked out on paper (temperature
scaling included), gradients reaching only the student, and two teachers' weights."""

from __future__ import annotations

import math

import pytest
import torch
from mask_teacher_helpers import hand_batch, step_context

from maskteacher.errors import UserError
from maskteacher.models.prompt_features import PromptDecoding
from maskteacher.train.data.batch import TeacherTargets
from maskteacher.train.distill import losses as dl
from maskteacher.train.distill.feature_kd import FeatureDistillation, KDTeacher
from maskteacher.train.distill.prompt_blocks import (
    DecoderMaskToken,
    DenseMaskLogits,
    EncoderPatch,
    PromptEmbed,
)
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.base import SupervisionOutput
from maskteacher.train.supervision.criterion import weighted_total

LN2, LN3 = math.log(2.0), math.log(3.0)
#: KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2)
KL_34 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_encoder_patch_by_hand():
    block = EncoderPatch(w_l2=2.0, w_cos=3.0, weight=1.0)
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).reshape(2, 2, 1, 1).requires_grad_(True)
    t = torch.tensor([[0.0, 1.0], [6.0, 8.0]]).reshape(2, 2, 1, 1)
    # image 0: MSE (1 + 1) / 2 = 1, 1 - cos = 1 -> 2 + 3 = 5; image 1: MSE (9 + 16) / 2 = 12.5,
    # cos = 1 -> 25; mean 15
    loss = block.loss(s, t, "t")
    assert loss.item() == pytest.approx(15.0)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_prompt_embed_normalises_channels_by_hand():
    block = PromptEmbed(w_mse=0.7, w_cos=0.3, weight=1.0)
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    t = torch.tensor([[0.0, 2.0], [6.0, 8.0]]).reshape(2, 2, 1, 1)
    # prompt 0: unit vectors (1, 0) vs (0, 1): MSE 1, 1 - cos 1 -> 0.7 + 0.3; prompt 1: the same
    # direction at another scale: 0 (the MSE is of the normalised vectors)
    assert block.per_prompt(s, t, "t").tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_decoder_mask_token_temperature_by_hand():
    # teacher logits (T ln 3, 0) at T = 0.5 give softmax (3/4, 1/4); the student's (0, 0) give
    # (1/2, 1/2): KL = KL_34, times T^2 = 1/4, summed over the 4 tokens, times w_kl
    t_half = torch.tensor([0.5 * LN3, 0.0]).expand(1, 4, 2)
    s = torch.zeros(1, 4, 2, requires_grad=True)
    block = DecoderMaskToken(w_kl=2.0, temperature=0.5, weight=1.0)
    loss = block.per_prompt(s, t_half, "t")
    assert loss.item() == pytest.approx(2.0 * 4 * 0.25 * KL_34)
    # T = 2: the same teacher probabilities need logits 2 ln 3; T^2 = 4 keeps the scale
    t_two = torch.tensor([2.0 * LN3, 0.0]).expand(1, 4, 2)
    two = DecoderMaskToken(w_kl=2.0, temperature=2.0, weight=1.0).per_prompt(s, t_two, "t")
    assert two.item() == pytest.approx(2.0 * 4 * 4.0 * KL_34)
    loss.backward()
    assert s.grad is not None


def test_decoder_mask_token_drops_the_hq_token():
    s = torch.zeros(1, 4, 2)
    t = torch.cat([torch.zeros(1, 4, 2), torch.tensor([[[9.0, -9.0]]])], dim=1)  # 5th: HQ
    block = DecoderMaskToken(w_kl=1.0, temperature=1.0, weight=1.0)
    assert block.per_prompt(s, t, "t").item() == pytest.approx(0.0, abs=1e-7)


def test_dense_mask_logits_by_hand():
    # p = sigmoid(0) = 1/2, q = sigmoid(ln 3) = 3/4: Bernoulli KL(q || p) = KL_34; focal with
    # gamma 2: -[q (1-p)^2 ln p + (1-q) p^2 ln(1-p)] = (3/4 + 1/4) / 4 * ln 2
    block = DenseMaskLogits(w_kl=0.6, w_focal=0.4, gamma=2.0, weight=1.0)
    s = torch.zeros(2, 1, 3, 3, requires_grad=True)
    t = torch.full((2, 1, 3, 3), LN3)
    per = block.per_prompt(s, t, "t")
    assert per.tolist() == pytest.approx([0.6 * KL_34 + 0.4 * 0.25 * LN2] * 2)
    per.sum().backward()
    # dKL/ds = p - q = -1/4 per pixel, averaged over the 9 pixels
    assert s.grad is not None and s.grad.lt(0).all()


def test_dense_losses_use_both_outcomes():
    """A student predicting foreground everywhere is not rewarded (the origin's foreground-only
    terms were lowest there)."""
    background = torch.full((1, 4), -6.0)
    good, everywhere = torch.full((1, 4), -6.0), torch.full((1, 4), 6.0)
    for fn in (dl.bernoulli_kl, lambda s, t: dl.soft_focal(s, t, gamma=2.0)):
        assert fn(good, background).item() < 0.01 * fn(everywhere, background).item()


def test_shape_mismatch_names_the_block_and_both_shapes():
    block = PromptEmbed(w_mse=1.0, w_cos=1.0, weight=1.0)
    with pytest.raises(UserError, match=r"prompt_embed.*\(64, 4, 4\).*\(256, 4, 4\)"):
        block.per_prompt(torch.zeros(2, 64, 4, 4), torch.zeros(2, 256, 4, 4), "sam_h")


# ----------------------------------------------------------------------- two teachers, weights


class FixedDecoder:
    """A stand-in decoder returning fixed teacher decodings (its calls are counted)."""

    def __init__(self, mask_tokens: torch.Tensor, image_tokens: torch.Tensor) -> None:
        self.out = PromptDecoding(None, None, None, mask_tokens, image_tokens)
        self.calls = 0

    def __call__(self, batch, embeddings) -> PromptDecoding:
        self.calls += 1
        return self.out


def test_two_teachers_weights_and_lambda(monkeypatch):
    low = 4
    batch = hand_batch(
        [torch.zeros(1, low, low, dtype=torch.bool)], [torch.zeros(0, low, low)],
        [torch.tensor([[2.0, 2.0], [6.0, 6.0]])],
    )  # fmt: skip
    student_tokens = torch.zeros(2, 4, 2, requires_grad=True)
    preds = Predictions(
        logits=torch.zeros(2, 1, low, low), iou_pred=torch.zeros(2, 1), tokens=None,
        embeddings=torch.zeros(1, 2, 1, 1), mask_tokens=student_tokens,
        image_tokens=torch.zeros(2, 2, 1, 1),
    )  # fmt: skip
    t = torch.tensor([LN3, 0.0]).expand(2, 4, 2)  # T = 1: KL_34 per token
    a, b = FixedDecoder(t, torch.zeros(2, 2, 1, 1)), FixedDecoder(2 * t, torch.zeros(2, 2, 1, 1))
    kd = FeatureDistillation(
        teachers=[KDTeacher("a", 0.7, decoder=a), KDTeacher("b", 0.3, decoder=b)],
        blocks=[DecoderMaskToken(w_kl=1.0, temperature=1.0, weight=2.0)],
        batch_fields=frozenset(),
    )
    for teacher in kd.teachers:  # the cached embedding the stand-in decoders are given
        teacher.source = lambda batch: [TeacherTargets(embedding=torch.zeros(2, 1, 1))]
    out = kd(preds, batch, step_context(lambda_coef=0.5), SupervisionOutput({}, {}))
    kl_a = 4 * KL_34
    p = torch.softmax(torch.tensor([2 * LN3, 0.0]), 0)  # (9/10, 1/10)
    kl_b = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert out.terms["kd/a/decoder_mask_token"].item() == pytest.approx(kl_a, rel=1e-5)
    assert out.terms["kd/b/decoder_mask_token"].item() == pytest.approx(kl_b, rel=1e-5)
    assert out.weights == {"kd/a/decoder_mask_token": 0.5 * 0.7 * 2.0,
                           "kd/b/decoder_mask_token": 0.5 * 0.3 * 2.0}  # fmt: skip
    total = weighted_total(out.terms, out.weights)
    assert total.item() == pytest.approx(0.5 * 2.0 * (0.7 * kl_a + 0.3 * kl_b), rel=1e-5)
    assert a.calls == 1 and b.calls == 1  # one decoding per teacher and step
    total.backward()
    assert student_tokens.grad is not None
