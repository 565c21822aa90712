"""Model registry: small builder functions in a dict, segment-anything ``build_sam.py`` style.

Every entry builds a registry model with randomly initialised weights for a given
``image_size`` (the model input frame; a multiple of 16):

- ``vit_h`` / ``vit_l`` / ``vit_b``: segment-anything's own ``ImageEncoderViT``, ``PromptEncoder``,
  ``MaskDecoder`` and ``TwoWayTransformer`` with the official hyper-parameters;
- ``vit_t``: MobileSAM = our :class:`~maskteacher.models.tiny_vit.TinyViT` (TinyViT-5M) encoder +
  the same prompt encoder and mask decoder;
- ``vit_t_tiny`` / ``vit_b_tiny``: test-sized variants of the two encoder families. They also
  narrow the prompt encoder and mask decoder to 64 channels (transformer MLP 128, 2 heads), which
  makes CPU tests several times faster; the encoders' ``out_chans`` equal that width;
- ``<name>_hq`` for each of those (:data:`HQ_VARIANTS`): SAM-HQ, the same encoder with
  segment-anything-hq's ``MaskDecoderHQ`` (:mod:`maskteacher.models.sam_hq`). These are
  ``segment_anything_hq.modeling.Sam`` models; the others are ``segment_anything.modeling.Sam``
  (:class:`RegistrySam`). Both carry :class:`RegistryInfo`.

``image_size`` sets the encoder's ``img_size``, the prompt encoder's ``image_embedding_size``
(``image_size // 16``) and ``input_image_size``; low-res masks are ``image_size // 4``.
Loading weights and the eval/train state are :func:`maskteacher.models.build_sam`'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from maskteacher.errors import UserError
from maskteacher.models.tiny_vit import TinyViT

PATCH_SIZE = 16  # image -> embedding downsampling of every registry encoder
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class RegistryInfo:
    """What a registry model knows about itself (mixed into :class:`RegistrySam` and SAM-HQ's
    :class:`~maskteacher.models.sam_hq.RegistrySamHQ`).

    Attributes: ``model_type`` (registry key), ``image_size`` (model input frame side),
    ``embedding_size`` (``image_size // 16``), ``low_res_size`` (``image_size // 4``).
    """

    model_type: str
    image_encoder: nn.Module

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.img_size)

    @property
    def embedding_size(self) -> int:
        return self.image_size // PATCH_SIZE

    @property
    def low_res_size(self) -> int:
        return self.image_size // 4


class RegistrySam(RegistryInfo, Sam):
    """``segment_anything.modeling.Sam`` that also knows its registry name and input size."""

    def __init__(
        self,
        *,
        model_type: str,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__(
            image_encoder=image_encoder,  # type: ignore[arg-type]
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
        self.model_type = model_type


@dataclass(frozen=True)
class DecoderSpec:
    """Widths of the prompt encoder + mask decoder (``dim`` is also the encoder's out_chans)."""

    dim: int = 256
    mlp_dim: int = 2048
    num_heads: int = 8
    iou_hidden_dim: int = 256
    mask_in_chans: int = 16


OFFICIAL_DECODER = DecoderSpec()
TINY_DECODER = DecoderSpec(dim=64, mlp_dim=128, num_heads=2, iou_hidden_dim=64)


@dataclass(frozen=True)
class ViTSpec:
    """Shape of a segment-anything ``ImageEncoderViT`` (blocks, width, heads, global blocks)."""

    depth: int
    width: int
    heads: int
    global_attn: tuple[int, ...]
    window: int = 14


VIT_H = ViTSpec(depth=32, width=1280, heads=16, global_attn=(7, 15, 23, 31))
VIT_L = ViTSpec(depth=24, width=1024, heads=16, global_attn=(5, 11, 17, 23))
VIT_B = ViTSpec(depth=12, width=768, heads=12, global_attn=(2, 5, 8, 11))
VIT_B_TINY = ViTSpec(depth=2, width=64, heads=2, global_attn=(1,), window=4)

#: TinyViT keyword arguments: MobileSAM's TinyViT-5M and the test-sized variant.
TINY_VIT_T = {
    "embed_dims": (64, 128, 160, 320),
    "depths": (2, 2, 6, 2),
    "num_heads": (2, 4, 5, 10),
    "window_sizes": (7, 7, 14, 7),
}
TINY_VIT_TINY = {
    "embed_dims": (16, 32, 48, 64),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 2, 4),
    "window_sizes": (7, 7, 7, 7),
    "classifier_classes": 10,
}


def sam_decoder_parts(decoder: DecoderSpec, image_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's prompt encoder and mask decoder of width ``decoder`` for
    ``image_size`` inputs (built in this order: random initialisation depends on it)."""
    grid = image_size // PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=decoder.dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=decoder.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=decoder.dim,
            mlp_dim=decoder.mlp_dim,
            num_heads=decoder.num_heads,
        ),
        transformer_dim=decoder.dim,
        iou_head_depth=3,
        iou_head_hidden_dim=decoder.iou_hidden_dim,
    )
    return prompt_encoder, mask_decoder


def _assemble(
    model_type: str, image_encoder: nn.Module, decoder: DecoderSpec, image_size: int
) -> RegistrySam:
    prompt_encoder, mask_decoder = sam_decoder_parts(decoder, image_size)
    return RegistrySam(
        model_type=model_type,
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
    )


def vit_encoder(
    spec: ViTSpec,
    image_size: int,
    *,
    out_chans: int,
    encoder_class: Callable[..., nn.Module] = ImageEncoderViT,
) -> nn.Module:
    """``encoder_class`` (segment-anything's or segment-anything-hq's ``ImageEncoderViT``,
    which share their arguments and parameter names) with the official ViT settings."""
    return encoder_class(
        img_size=image_size,
        patch_size=PATCH_SIZE,
        depth=spec.depth,
        embed_dim=spec.width,
        num_heads=spec.heads,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn,
        window_size=spec.window,
        out_chans=out_chans,
    )


def build_vit_h(image_size: int) -> RegistrySam:
    encoder = vit_encoder(VIT_H, image_size, out_chans=OFFICIAL_DECODER.dim)
    return _assemble("vit_h", encoder, OFFICIAL_DECODER, image_size)


def build_vit_l(image_size: int) -> RegistrySam:
    encoder = vit_encoder(VIT_L, image_size, out_chans=OFFICIAL_DECODER.dim)
    return _assemble("vit_l", encoder, OFFICIAL_DECODER, image_size)


def build_vit_b(image_size: int) -> RegistrySam:
    encoder = vit_encoder(VIT_B, image_size, out_chans=OFFICIAL_DECODER.dim)
    return _assemble("vit_b", encoder, OFFICIAL_DECODER, image_size)


def build_vit_t(image_size: int) -> RegistrySam:
    encoder = TinyViT(img_size=image_size, out_chans=OFFICIAL_DECODER.dim, **TINY_VIT_T)
    return _assemble("vit_t", encoder, OFFICIAL_DECODER, image_size)


def build_vit_t_tiny(image_size: int) -> RegistrySam:
    encoder = TinyViT(img_size=image_size, out_chans=TINY_DECODER.dim, **TINY_VIT_TINY)
    return _assemble("vit_t_tiny", encoder, TINY_DECODER, image_size)


def build_vit_b_tiny(image_size: int) -> RegistrySam:
    encoder = vit_encoder(VIT_B_TINY, image_size, out_chans=TINY_DECODER.dim)
    return _assemble("vit_b_tiny", encoder, TINY_DECODER, image_size)


def _sam_hq(model_type: str) -> Callable[[int], nn.Module]:
    """Registry entry of a SAM-HQ model: segment-anything-hq (which imports timm, ~2 s) is
    imported when the first one is built, not when maskteacher is."""

    def build(image_size: int) -> nn.Module:
        try:
            from maskteacher.models.sam_hq import HQ_BUILDERS
        except ImportError as exc:  # a broken install: the package or timm is missing
            raise UserError(
                f"model type {model_type} is SAM-HQ, built from the segment-anything-hq package, "
                f"which could not be imported ({exc}); install it: pip install "
                "segment-anything-hq timm"
            ) from exc
        return HQ_BUILDERS[model_type](image_size)

    build.__name__ = f"build_{model_type}"
    return build


#: The SAM-HQ variant of each SAM entry: the same image encoder, segment-anything-hq's
#: ``MaskDecoderHQ`` (HQ output token + fusion of an early encoder feature), see ``sam_hq``.
HQ_VARIANTS: dict[str, str] = {
    "vit_h": "vit_h_hq",
    "vit_l": "vit_l_hq",
    "vit_b": "vit_b_hq",
    "vit_t": "vit_t_hq",  # segment-anything-hq's light "vit_tiny" HQ-SAM (MobileSAM's encoder)
    "vit_t_tiny": "vit_t_tiny_hq",
    "vit_b_tiny": "vit_b_tiny_hq",
}

SAM_BUILDERS: dict[str, Callable[[int], RegistrySam]] = {
    "vit_h": build_vit_h,
    "vit_l": build_vit_l,
    "vit_b": build_vit_b,
    "vit_t": build_vit_t,
    "vit_t_tiny": build_vit_t_tiny,
    "vit_b_tiny": build_vit_b_tiny,
}
MODEL_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    **SAM_BUILDERS,
    **{hq: _sam_hq(hq) for hq in HQ_VARIANTS.values()},
}
MODEL_TYPES: tuple[str, ...] = tuple(MODEL_BUILDERS)
#: The prompt encoder + mask decoder widths of each SAM entry (its SAM-HQ variant has the same).
DECODER_SPECS: dict[str, DecoderSpec] = {
    "vit_h": OFFICIAL_DECODER,
    "vit_l": OFFICIAL_DECODER,
    "vit_b": OFFICIAL_DECODER,
    "vit_t": OFFICIAL_DECODER,
    "vit_t_tiny": TINY_DECODER,
    "vit_b_tiny": TINY_DECODER,
}
SAM_TYPES: tuple[str, ...] = tuple(SAM_BUILDERS)
HQ_TYPES: tuple[str, ...] = tuple(HQ_VARIANTS.values())

# Entries whose exported state dict the upstream builders (segment-anything / MobileSAM) accept.
OFFICIAL_TYPES: tuple[str, ...] = ("vit_h", "vit_l", "vit_b", "vit_t")
