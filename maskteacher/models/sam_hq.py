"""SAM-HQ registry models, built from the official ``segment-anything-hq`` package's modules.

SAM-HQ (Ke et al., "Segment Anything in High Quality") keeps SAM's image encoder and prompt
encoder and extends the mask decoder (``segment_anything_hq.modeling.MaskDecoderHQ``) with

- an HQ output token (``hf_token``) and its hypernetwork MLP (``hf_mlp``);
- "HQ features": an early encoder feature map (the output of the first global-attention ViT block;
  for the light TinyViT model the output of stage 1) lifted to the low-res frame by
  ``compress_vit_feat``, plus the final image embedding lifted by ``embedding_encoder``;
  the HQ token's mask is read from ``embedding_maskfeature(SAM's upscaled embedding)`` + those.

The image encoders therefore return ``(embedding, intermediate features)``: segment-anything-hq's
``ImageEncoderViT`` does (a list of every global block's output); for the light model (``vit_t_hq``)
:class:`TinyViTHQ` is our TinyViT returning its stage-1 output, because the package's ``TinyViT``
hard-codes a 64 x 64 grid (image_size 1024 only) while ours takes any image_size. Parameter names
and shapes are the package's (``sam_model_registry`` of ``segment_anything_hq``), so its
checkpoints (``sam_hq_vit_h.pth``, ``sam_hq_vit_tiny.pth``, ...) load with the usual resizing of
the ViT position tables (:func:`maskteacher.models.load_checkpoint`).

Decoding everything-mode prompts with these models is :mod:`maskteacher.models.decode_hq`.
Importing this module imports segment-anything-hq, which imports timm (about 2 s, with
deprecation warnings that are silenced here); the registry imports it only when an HQ model
is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from maskteacher.models.registry import (
    OFFICIAL_DECODER,
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    TINY_DECODER,
    TINY_VIT_T,
    TINY_VIT_TINY,
    VIT_B,
    VIT_B_TINY,
    VIT_H,
    VIT_L,
    DecoderSpec,
    RegistryInfo,
    ViTSpec,
    vit_encoder,
)
from maskteacher.models.tiny_vit import TinyViT

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # timm's deprecation and registry-overwrite warnings
    from segment_anything_hq import modeling as hq_modeling


class RegistrySamHQ(RegistryInfo, hq_modeling.Sam):
    """``segment_anything_hq.modeling.Sam`` that knows its registry name and input size, so the
    package's ``SamPredictor`` / ``SamAutomaticMaskGenerator`` run on it."""

    def __init__(
        self,
        *,
        model_type: str,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
        self.model_type = model_type


class TinyViTHQ(TinyViT):
    """Our TinyViT returning ``(embedding, [stage-1 output])`` like segment-anything-hq's.

    (B, 3, S, S) -> (B, out_chans, S/16, S/16) and a list holding the (B, S/16, S/16, C2)
    channels-last output of stage 1 (after its patch merging; C2 = ``embed_dims[2]``), which
    is what the package's TinyViT returns at S = 1024.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        x = self.patch_embed(x)
        interm = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i == 1:
                interm.append(x.permute(0, 2, 3, 1))
        return self.neck(x), interm


def _assemble_hq(
    model_type: str,
    image_encoder: nn.Module,
    decoder: DecoderSpec,
    image_size: int,
    *,
    vit_dim: int,
) -> RegistrySamHQ:
    """segment-anything-hq's PromptEncoder / MaskDecoderHQ / TwoWayTransformer around an encoder
    whose early feature has ``vit_dim`` channels (the package's ``_build_sam`` settings)."""
    prompt_encoder, mask_decoder = hq_decoder_parts(decoder, image_size, vit_dim=vit_dim)
    return RegistrySamHQ(
        model_type=model_type,
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
    )


def hq_decoder_parts(
    decoder: DecoderSpec, image_size: int, *, vit_dim: int
) -> tuple[nn.Module, nn.Module]:
    """segment-anything-hq's prompt encoder and ``MaskDecoderHQ`` (early features of ``vit_dim``
    channels), built in this order (random initialisation depends on it)."""
    grid = image_size // PATCH_SIZE
    prompt_encoder = hq_modeling.PromptEncoder(
        embed_dim=decoder.dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=decoder.mask_in_chans,
    )
    mask_decoder = hq_modeling.MaskDecoderHQ(
        num_multimask_outputs=3,
        transformer=hq_modeling.TwoWayTransformer(
            depth=2,
            embedding_dim=decoder.dim,
            mlp_dim=decoder.mlp_dim,
            num_heads=decoder.num_heads,
        ),
        transformer_dim=decoder.dim,
        iou_head_depth=3,
        iou_head_hidden_dim=decoder.iou_hidden_dim,
        vit_dim=vit_dim,
    )
    return prompt_encoder, mask_decoder


def _vit_hq(model_type: str, spec: ViTSpec, decoder: DecoderSpec) -> Callable[[int], RegistrySamHQ]:
    def build(image_size: int) -> RegistrySamHQ:
        encoder = vit_encoder(
            spec, image_size, out_chans=decoder.dim, encoder_class=hq_modeling.ImageEncoderViT
        )
        return _assemble_hq(model_type, encoder, decoder, image_size, vit_dim=spec.width)

    return build


def _tiny_vit_hq(
    model_type: str, shape: dict, decoder: DecoderSpec
) -> Callable[[int], RegistrySamHQ]:
    def build(image_size: int) -> RegistrySamHQ:
        encoder = TinyViTHQ(img_size=image_size, out_chans=decoder.dim, **shape)
        vit_dim = shape["embed_dims"][2]
        return _assemble_hq(model_type, encoder, decoder, image_size, vit_dim=vit_dim)

    return build


HQ_BUILDERS: dict[str, Callable[[int], RegistrySamHQ]] = {
    "vit_h_hq": _vit_hq("vit_h_hq", VIT_H, OFFICIAL_DECODER),
    "vit_l_hq": _vit_hq("vit_l_hq", VIT_L, OFFICIAL_DECODER),
    "vit_b_hq": _vit_hq("vit_b_hq", VIT_B, OFFICIAL_DECODER),
    "vit_t_hq": _tiny_vit_hq("vit_t_hq", TINY_VIT_T, OFFICIAL_DECODER),
    "vit_t_tiny_hq": _tiny_vit_hq("vit_t_tiny_hq", TINY_VIT_TINY, TINY_DECODER),
    "vit_b_tiny_hq": _vit_hq("vit_b_tiny_hq", VIT_B_TINY, TINY_DECODER),
}

#: Width of each SAM-HQ entry's early encoder feature (``vit_dim`` of its ``MaskDecoderHQ``).
HQ_VIT_DIMS: dict[str, int] = {
    "vit_h_hq": VIT_H.width,
    "vit_l_hq": VIT_L.width,
    "vit_b_hq": VIT_B.width,
    "vit_t_hq": TINY_VIT_T["embed_dims"][2],
    "vit_t_tiny_hq": TINY_VIT_TINY["embed_dims"][2],
    "vit_b_tiny_hq": VIT_B_TINY.width,
}
