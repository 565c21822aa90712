"""Learning-rate schedule, parameter groups and per-epoch settings."""

from __future__ import annotations

import math

import pytest
import torch

from maskteacher.models import build_sam
from maskteacher.train.schedule import (
    Freeze,
    LambdaPlateau,
    Stage,
    build_optimizer,
    build_scheduler,
    epoch_settings,
    param_groups,
    warmup_cosine,
)


def test_warmup_then_cosine_to_floor():
    f = lambda s: warmup_cosine(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


def test_param_groups_and_scheduler_per_optimizer_step():
    sam = build_sam("vit_t_tiny", image_size=64)
    opt = build_optimizer(sam, lr=1e-3, weight_decay=0.0, encoder_lr_scale=0.1)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["image_encoder", "heads"]
    n_enc = sum(p.numel() for p in sam.image_encoder.parameters())
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == n_enc
    sched = build_scheduler(opt, warmup_steps=2, total_steps=4, min_lr_ratio=0.0)
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.5e-4, 0.5e-3])
    assert lrs[1] == pytest.approx([1e-4, 1e-3])
    assert lrs[3] == pytest.approx([0.5e-4, 0.5e-3])  # cosine halfway
    state = sched.state_dict()
    assert state["last_epoch"] == 4 and all(v is None for v in state["lr_lambdas"])


def test_stages_override_in_order_and_unfreeze():
    base = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
    stages = [
        Stage("warm", 0, 2, loss_weights={"focal": 0.0}, distillation=False),
        Stage("late", 1, 5, loss_weights={"dice": 3.0}, lambda_coef=0.5),
    ]
    freeze = Freeze(image_encoder=True, unfreeze_epoch=2)
    s0 = epoch_settings(
        0, loss_weights=base, distillation=True, lambda_coef=1.0, stages=stages, freeze=freeze
    )
    assert s0.loss_weights["focal"] == 0.0 and s0.loss_weights["dice"] == 1.0
    assert (
        s0.distillation is False and s0.trainable == (False, True, True) and s0.stages == ("warm",)
    )
    s1 = epoch_settings(
        1, loss_weights=base, distillation=True, lambda_coef=1.0, stages=stages, freeze=freeze
    )
    assert (
        s1.loss_weights["focal"] == 0.0 and s1.loss_weights["dice"] == 3.0 and s1.lambda_coef == 0.5
    )
    s2 = epoch_settings(
        2, loss_weights=base, distillation=True, lambda_coef=1.0, stages=stages, freeze=freeze
    )
    assert s2.loss_weights["focal"] == 15.0 and s2.distillation is True
    assert s2.trainable == (True, True, True)
    assert base["focal"] == 15.0  # not mutated


def test_frozen_parts_get_no_update():
    sam = build_sam("vit_t_tiny", image_size=64)
    from maskteacher.models import set_trainable

    set_trainable(sam, image_encoder=False, prompt_encoder=True, mask_decoder=True)
    opt = build_optimizer(sam, lr=1e-2, weight_decay=0.1, encoder_lr_scale=1.0)
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    emb = sam.image_encoder(torch.zeros(1, 3, 64, 64))
    (emb.sum() + sum(p.sum() for p in sam.mask_decoder.parameters())).backward()
    opt.step()
    after = sam.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_optimizer_is_fused_adamw_and_steps_like_the_single_tensor_loop():
    """On the CPU the optimizer is torch's fused AdamW; its steps equal the single-tensor
    loop's to the last bits (measured max relative difference ~1e-7 after 5 steps)."""
    torch.manual_seed(0)
    models = [build_sam("vit_t_tiny", image_size=64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], lr=1e-3, weight_decay=1e-4, encoder_lr_scale=0.1)
    assert fused.defaults["fused"] is True
    single = torch.optim.AdamW(
        param_groups(models[1], lr=1e-3, encoder_lr_scale=0.1),
        lr=1e-3,
        weight_decay=1e-4,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
    for step in range(5):
        for model in models:
            for p, g in zip(model.parameters(), grads):
                p.grad = g * (step + 1) + 0.1 * step
        fused.step()
        single.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_lambda_plateau_by_hand():
    rule = LambdaPlateau(patience=2, factor=0.5)
    scale, wait = 1.0, 0
    steps = []
    for score, best in [(0.5, None), (0.5, 0.5), (0.4, 0.5), (0.45, 0.5), (0.5, 0.5), (0.6, 0.5)]:
        scale, wait = rule.step(scale, wait, rule.improved(score, best))
        steps.append((scale, wait))
    # first: an improvement (no best yet) keeps the scale at its cap 1; then two plateaus in a
    # row halve it; two more halve it again; an improvement (by more than 1e-4) doubles it
    assert steps == [(1.0, 0), (1.0, 1), (0.5, 0), (0.5, 1), (0.25, 0), (0.5, 0)]
    assert not rule.improved(0.50005, 0.5) and rule.improved(0.5002, 0.5)
    floor = LambdaPlateau(patience=0, factor=0.1)
    assert floor.step(0.002, 0, False) == (1e-3, 0)  # never below 1e-3 of lambda_coef
