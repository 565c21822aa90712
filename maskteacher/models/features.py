"""What the mask decoder reads of an image, and decoding point prompts on it, SAM or SAM-HQ.

:func:`encode_features` runs the image encoder (batched) and returns :class:`ImageFeatures`: the
image embedding, plus for a SAM-HQ model (:mod:`maskteacher.models.sam_hq`) the HQ features its
decoder reads besides (computed once per image from the encoder's early feature map).
:func:`decode_prompts` decodes single-point prompts across images on them -- with
:func:`~maskteacher.models.decode_points` for SAM, with
:func:`~maskteacher.models.decode_hq.decode_points_hq` for SAM-HQ -- so the everything-mode
generator and precompute's verification need not know which kind of model they run.
:func:`prompt_decoder` binds those choices and the speed options (bf16 autocast,
``torch.compile``) into the one call the generator makes per chunk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from maskteacher.models.attention import sdpa_attention
from maskteacher.models.decode import DecoderOutput, decode_points, preprocess
from maskteacher.models.decode_hq import decode_points_hq, hq_features
from maskteacher.models.hq import is_hq_model


def model_device(model: nn.Module) -> torch.device:
    """The device the model's buffers live on."""
    return model.pixel_mean.device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class ImageFeatures:
    """What the mask decoder reads of B images.

    embeddings: (B, C, E, E) float32 image-encoder output (E = image_size / 16).
    hq: (B, C/8, L, L) float32 SAM-HQ features (:func:`~maskteacher.models.decode_hq.hq_features`,
    low-res frame) for a SAM-HQ model, None for SAM.
    """

    embeddings: torch.Tensor
    hq: torch.Tensor | None = None


@torch.no_grad()
def encode_features(
    model: nn.Module,
    images: torch.Tensor,
    input_hw: torch.Tensor,
    *,
    bf16: bool = False,
    with_hq: bool = True,
    sdpa: bool = False,
) -> ImageFeatures:
    """(B, 3, S, S) uint8 padded model-input images -> :class:`ImageFeatures` (the HQ features
    only for a SAM-HQ model and ``with_hq``); ``sdpa``: the ViT encoder's attention through
    SDPA (:mod:`maskteacher.models.attention`)."""
    with autocast(model_device(model), bf16), sdpa_attention(model.image_encoder, sdpa):
        out = model.image_encoder(preprocess(model, images, input_hw))
        if not is_hq_model(model):
            return ImageFeatures(out.float())
        embeddings, interm = out
        hq = hq_features(model, embeddings, interm).float() if with_hq else None
        return ImageFeatures(embeddings.float(), hq)


def encode_images(
    model: nn.Module, images: torch.Tensor, input_hw: torch.Tensor, *, bf16: bool = False
) -> torch.Tensor:
    """(B, 3, S, S) uint8 padded model-input images -> (B, C, E, E) float32 image embeddings."""
    return encode_features(model, images, input_hw, bf16=bf16, with_hq=False).embeddings


def decode_prompts(
    model: nn.Module,
    features: ImageFeatures,
    points: torch.Tensor,
    *,
    image_index: torch.Tensor | None = None,
    multimask_output: bool,
    hq_token_only: bool = False,
    return_tokens: bool = False,
) -> DecoderOutput:
    """One positive point prompt per row of ``points`` (P, 2) decoded on its image's features:
    :func:`~maskteacher.models.decode_points` for SAM (K = 3 or 1 masks per prompt),
    :func:`~maskteacher.models.decode_hq.decode_points_hq` for SAM-HQ (K = 1)."""
    if features.hq is None:
        return decode_points(
            model,
            features.embeddings,
            points,
            image_index=image_index,
            multimask_output=multimask_output,
            return_tokens=return_tokens,
        )
    if image_index is None:
        image_index = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    return decode_points_hq(
        model,
        features.embeddings,
        features.hq,
        points,
        image_index=image_index,
        multimask_output=multimask_output,
        hq_token_only=hq_token_only,
        return_tokens=return_tokens,
    )


@functools.cache
def _compiled_decode_prompts() -> Callable[..., DecoderOutput]:
    return torch.compile(decode_prompts)


def prompt_decoder(
    model: nn.Module,
    features: ImageFeatures,
    *,
    multimask_output: bool,
    hq_token_only: bool = False,
    return_tokens: bool = False,
    bf16: bool = False,
    compile: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], DecoderOutput]:
    """``decode(points (P, 2), image_index (P,)) -> DecoderOutput``: :func:`decode_prompts` on
    ``features`` with these settings, under bfloat16 autocast with ``bf16``; ``compile``: the
    ``torch.compile`` d :func:`decode_prompts` (one compiled function per process; it recompiles
    for a new chunk size or model, which the first calls pay for)."""
    fn = _compiled_decode_prompts() if compile else decode_prompts
    device = features.embeddings.device

    def decode(points: torch.Tensor, image_index: torch.Tensor) -> DecoderOutput:
        with autocast(device, bf16):
            return fn(
                model,
                features,
                points,
                image_index=image_index,
                multimask_output=multimask_output,
                hq_token_only=hq_token_only,
                return_tokens=return_tokens,
            )

    return decode
