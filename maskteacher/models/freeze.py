"""Freezing helpers for the ``freeze`` config section and BatchNorm handling during fine-tuning."""

from __future__ import annotations

from segment_anything.modeling import Sam
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def set_trainable(
    model: Sam, *, image_encoder: bool, prompt_encoder: bool, mask_decoder: bool
) -> None:
    """Set ``requires_grad`` of every parameter of the three SAM parts (True = trained)."""
    model.image_encoder.requires_grad_(image_encoder)
    model.prompt_encoder.requires_grad_(prompt_encoder)
    model.mask_decoder.requires_grad_(mask_decoder)


def set_batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer under ``module`` in eval mode (SyncBatchNorm included).

    Call after ``model.train()``: BN then normalises with (and keeps) its running statistics,
    which batch sizes of 1-8 would otherwise wreck. Affine weights still train if not frozen.
    """
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.eval()
