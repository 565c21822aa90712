"""Feature-distillation losses and the distillation block on tiny tensors, against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from mask_teacher_helpers import box_mask, hand_batch, hand_predictions, logits_of, step_context

from maskteacher.errors import UserError
from maskteacher.train.data.batch import TeacherTargets
from maskteacher.train.distill import losses as dl
from maskteacher.train.distill.blocks import (
    AttentionMatching,
    DecoderMatching,
    EncoderMatching,
    RelationalKD,
)
from maskteacher.train.distill.feature_kd import FeatureDistillation, KDTeacher
from maskteacher.train.supervision.base import SupervisionOutput
from maskteacher.train.supervision.matcher import Match

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

LN3 = math.log(3)


def test_encoder_loss_hand_value():
    student = torch.zeros(1, 2, 2, 2)
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, 0, 1, 1] = 2 * LN3  # channel 0: softmax(t / 2) = (1, 1, 1, 3) / 6
    block = EncoderMatching(lambda_mse=1.0, lambda_kl=0.5, temperature=2.0, weight=1.0)
    # MSE: (2 ln 3)^2 over 8 values; KL channel 0: 0.5 log(2/3) + 0.5 log 2 = 0.5 log(4/3),
    # times T^2 = 4; channel 1: 0; mean over channels: log(4/3)
    want = (2 * LN3) ** 2 / 8 + 0.5 * math.log(4 / 3)
    assert float(block.loss(student, teacher, "t")) == pytest.approx(want, rel=1e-6)
    assert float(block.loss(teacher, teacher, "t")) == pytest.approx(0.0, abs=1e-7)


def test_decoder_pair_loss_hand_value():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    block = DecoderMatching(
        lambda_mse=1.0, lambda_cos=2.0, lambda_kl=3.0, temperature=1.0, weight=1.0,
        iou_threshold=0.3,
    )  # fmt: skip
    e = math.e
    # MSE 1, 1 - cos = 1, KL(softmax(t) || softmax(s)) = (e - 1) / (e + 1)
    want = 1.0 + 2.0 + 3.0 * (e - 1) / (e + 1)
    assert block.pair_loss(s, t, "t").tolist() == pytest.approx([want], rel=1e-6)


def test_attention_maps_standardised_and_kl_hand_value():
    f = torch.tensor([[[[1.0, 3.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2): energy (1, 5)
    assert dl.attention_map(f)[0].tolist() == pytest.approx([-1.0, 1.0])
    block = AttentionMatching(lambda_=1.0, temperature=1.0, weight=1.0)
    assert float(block.loss(f, f * 7, "t")) == pytest.approx(0.0, abs=1e-6)
    reverse = f.flip(-1)  # map (1, -1)
    e2 = math.e**2
    want = 2 * (e2 - 1) / (e2 + 1)  # KL(softmax(-1, 1) || softmax(1, -1))
    assert float(block.loss(reverse, f, "t")) == pytest.approx(want, rel=1e-5)
    # scale does not matter, widths may differ (3 teacher channels, 2 student channels)
    teacher = torch.cat([reverse, reverse[:, :1]], dim=1) * 10  # map (1, -1) again
    assert float(block.loss(f, teacher, "t")) == pytest.approx(want, rel=1e-5)


def test_rkd_hand_values_and_small_batches():
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right isosceles triangle
    teacher = torch.eye(3)  # equilateral triangle in 3-D: widths may differ
    m = (2 + math.sqrt(2)) / 3  # mean student distance
    d = [1 / m - 1] * 4 + [math.sqrt(2) / m - 1] * 2  # normalised, minus the teacher's 1
    want_dist = sum(0.5 * x * x for x in d) / 6  # smooth L1 with beta 1 (all |x| < 1)
    assert float(dl.rkd_distance(student, teacher)) == pytest.approx(want_dist, rel=1e-5)
    c = [0.0, 0.0] + [math.sqrt(0.5)] * 4  # cosines at the right angle and the two 45s
    want_angle = sum(0.5 * (x - 0.5) ** 2 for x in c) / 6  # teacher: cos 60 = 0.5
    assert float(dl.rkd_angle(student, teacher)) == pytest.approx(want_angle, rel=1e-5)
    block = RelationalKD(lambda_=2.0, dist_factor=1.0, angle_factor=3.0, weight=1.0)
    emb_s = student[:, :, None, None].expand(3, 2, 2, 2)  # pooling gives the vectors back
    emb_t = teacher[:, :, None, None].expand(3, 3, 4, 4)
    want = 2.0 * (want_dist + 3.0 * want_angle)
    assert float(block.loss(emb_s, emb_t)) == pytest.approx(want, rel=1e-5)
    for n in (1, 2):  # fewer than 3 images: exactly 0, finite, still differentiable
        s = student[:n].clone().requires_grad_(True)
        loss = dl.rkd_distance(s, teacher[:n]) + dl.rkd_angle(s, teacher[:n])
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_shape_mismatches_are_errors_not_broadcasts():
    enc = EncoderMatching(1.0, 1.0, 1.0, 1.0)
    with pytest.raises(UserError, match=r"encoder_matching.*\(64, 4, 4\).*'big'.*\(256, 4, 4\)"):
        enc.loss(torch.zeros(2, 64, 4, 4), torch.zeros(2, 256, 4, 4), "big")
    with pytest.raises(UserError, match=r"attention_matching.*\(64, 4, 4\).*\(64, 8, 8\)"):
        AttentionMatching(1.0, 1.0, 1.0).loss(
            torch.zeros(2, 64, 4, 4), torch.zeros(2, 64, 8, 8), "t"
        )
    dec = DecoderMatching(1.0, 1.0, 1.0, 1.0, 1.0, 0.3)
    with pytest.raises(UserError, match=r"decoder_matching.*\(64,\).*\(256,\)"):
        dec.pair_loss(torch.zeros(3, 64), torch.zeros(3, 256), "t")


# --------------------------------------------------------------------- the distillation block


def kd_case():
    """One 16 x 16 image, two student predictions with tokens, two teacher masks with tokens."""
    low = 4
    s0, s1 = box_mask(low, 0, 2, 0, 2), box_mask(low, 2, 4, 2, 4)
    t_masks = torch.stack([s1, s0])  # teacher mask 0 = s1, teacher mask 1 = s0
    t_tokens = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    s_tokens = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]], requires_grad=True)  # (P, K, C)
    s_emb = torch.zeros(1, 2, 1, 1, requires_grad=True)
    teacher = TeacherTargets(
        logits=logits_of(t_masks), tokens=t_tokens, embedding=torch.ones(2, 1, 1)
    )
    batch = hand_batch(
        [s0[None]], [teacher.logits], [torch.tensor([[2.0, 2.0], [14.0, 14.0]])], teacher=[teacher]
    )
    preds = hand_predictions(
        torch.stack([logits_of(s0), logits_of(s1)]), torch.tensor([0.5, 0.5]),
        embeddings=s_emb, tokens=s_tokens,
    )  # fmt: skip
    return batch, preds


def kd_block(*blocks) -> FeatureDistillation:
    teacher = KDTeacher("t", 0.5, source=lambda batch: batch.teacher, from_batch=True)
    return FeatureDistillation(teachers=[teacher], blocks=list(blocks), batch_fields=frozenset())


def test_block_weights_switch_and_decoder_pairs():
    batch, preds = kd_case()
    dec = DecoderMatching(1.0, 0.0, 0.0, 1.0, 4.0, iou_threshold=0.5)
    enc = EncoderMatching(1.0, 0.0, 1.0, 2.0)
    aux = kd_block(enc, dec)
    assert aux.needs_tokens
    out = aux(preds, batch, step_context(lambda_coef=3.0), SupervisionOutput({}, {}))
    # weights: lambda_coef * teacher weight * block weight
    assert out.weights == {"kd/t/encoder": 3.0 * 0.5 * 2.0, "kd/t/decoder": 3.0 * 0.5 * 4.0}
    assert float(out.terms["kd/t/encoder"]) == pytest.approx(1.0)  # MSE of 0 vs 1
    # own matching: s0 -> teacher 1 (1, 1), s1 -> teacher 0 (0, 1); token MSEs 0.5 and 0.5
    assert float(out.terms["kd/t/decoder"]) == pytest.approx(0.5)
    # the strategy's student <-> teacher pairs are used when given: only (s1, teacher 0)
    given = SupervisionOutput(
        {}, {}, teacher_matches=[Match(torch.tensor([1]), torch.tensor([0]), torch.ones(1))]
    )
    out = aux(preds, batch, step_context(lambda_coef=3.0), given)
    assert float(out.terms["kd/t/decoder"]) == pytest.approx(0.5)  # ((0-0)^2 + (2-1)^2) / 2
    given = SupervisionOutput(
        {}, {}, teacher_matches=[Match(torch.tensor([0]), torch.tensor([0]), torch.ones(1))]
    )
    out = aux(preds, batch, step_context(), given)
    assert float(out.terms["kd/t/decoder"]) == pytest.approx(1.0)  # (1-0)^2 + (0-1)^2 over 2
    # the stage switch turns the whole block off
    off = aux(preds, batch, step_context(kd=False), SupervisionOutput({}, {}))
    assert off.terms == {} and off.weights == {}


def test_decoder_without_pairs_is_zero():
    batch, preds = kd_case()
    dec = DecoderMatching(1.0, 1.0, 1.0, 1.0, 1.0, iou_threshold=0.5)
    given = SupervisionOutput({}, {}, teacher_matches=[Match.empty()])
    out = kd_block(dec)(preds, batch, step_context(), given)
    assert float(out.terms["kd/t/decoder"]) == 0.0
