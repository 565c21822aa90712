"""Freezing helpers and BatchNorm kept in eval mode during fine-tuning."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from maskteacher.models import build_sam, set_batchnorm_eval, set_trainable


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_set_trainable_sets_requires_grad_per_part(flags):
    model = build_sam("vit_t_tiny", image_size=64)
    encoder, prompt, decoder = flags
    set_trainable(model, image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    for part, flag in zip(("image_encoder", "prompt_encoder", "mask_decoder"), flags):
        params = list(getattr(model, part).parameters())
        assert params and all(p.requires_grad is flag for p in params), part


def test_frozen_encoder_gets_no_gradient():
    model = build_sam("vit_t_tiny", image_size=64).train()
    set_trainable(model, image_encoder=False, prompt_encoder=True, mask_decoder=True)
    emb = model.image_encoder(torch.randn(1, 3, 64, 64))
    sparse, dense = model.prompt_encoder(
        points=(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), boxes=None, masks=None
    )
    masks, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
    masks.sum().backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert model.mask_decoder.iou_token.weight.grad is not None


def test_batchnorm_eval_keeps_running_statistics_during_training(randomize):
    model = build_sam("vit_t_tiny", image_size=64)
    randomize(model, seed=1)
    model.train()
    set_batchnorm_eval(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 + 3 + 3 * 3 + 3  # stem, 1 MBConv, 3 patch mergings, 3 local convs
    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }
    out = model.image_encoder(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not m.training for m in norms)
    assert model.training and model.image_encoder.layers[1].blocks[0].attn.training
    assert norms[0].weight.grad is not None  # affine BN parameters still train


def test_without_batchnorm_eval_small_batches_change_the_statistics():
    model = build_sam("vit_t_tiny", image_size=64).train()
    before = model.image_encoder.patch_embed.seq[0].bn.running_mean.clone()
    model.image_encoder(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.image_encoder.patch_embed.seq[0].bn.running_mean, before)


def test_set_batchnorm_eval_leaves_vit_models_alone():
    model = build_sam("vit_b_tiny", image_size=64).train()
    set_batchnorm_eval(model)
    assert all(m.training for m in model.modules())
