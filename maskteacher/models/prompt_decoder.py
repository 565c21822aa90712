"""A SAM model's prompt encoder + mask decoder alone: decoding prompts on cached embeddings.

A SAM's prompt-dependent part is small -- SAM-H's prompt encoder and mask decoder hold ~4.1 M
parameters (16 MB in float32), the same widths as MobileSAM's -- while its image encoder is
~95 % of the cost. :func:`build_prompt_decoder` builds only that part of a registry type
(SAM or SAM-HQ) for ``image_size`` inputs; the image encoder is never constructed.
:func:`load_prompt_decoder` fills it from a state dict (a full checkpoint's ``prompt_encoder.*``
and ``mask_decoder.*`` tensors, or the arrays a cache stores, see :func:`decoder_state`), frozen
and in eval mode. Its ``prompt_encoder`` / ``mask_decoder`` attributes are the ones
:func:`maskteacher.models.prompt_features.decode_features` reads, as on a full model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from maskteacher.errors import UserError
from maskteacher.models.registry import (
    DECODER_SPECS,
    HQ_TYPES,
    HQ_VARIANTS,
    MODEL_TYPES,
    sam_decoder_parts,
)

#: State-dict prefixes of the prompt encoder and the mask decoder (what a cache stores).
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


class PromptDecoder(nn.Module):
    """A registry model's prompt encoder and mask decoder (no image encoder, no pixel stats).

    model_type: the registry type it belongs to (``vit_h``, ``vit_h_hq``, ...).
    """

    def __init__(
        self, *, model_type: str, prompt_encoder: nn.Module, mask_decoder: nn.Module
    ) -> None:
        super().__init__()
        self.model_type = model_type
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def image_size(self) -> int:
        """S: the model input frame the prompt encoder maps points from."""
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def width(self) -> int:
        """C: channels of the image embedding, of decoder tokens and of the transformer."""
        return int(self.mask_decoder.transformer_dim)


def _base_type(model_type: str) -> str:
    return {hq: sam for sam, hq in HQ_VARIANTS.items()}.get(model_type, model_type)


def build_prompt_decoder(model_type: str, image_size: int) -> PromptDecoder:
    """The prompt encoder + mask decoder of registry type ``model_type`` for ``image_size``
    inputs, randomly initialised, in eval mode (its image encoder is not built)."""
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    spec = DECODER_SPECS[_base_type(model_type)]
    if model_type in HQ_TYPES:
        from maskteacher.models.sam_hq import HQ_VIT_DIMS, hq_decoder_parts

        parts = hq_decoder_parts(spec, image_size, vit_dim=HQ_VIT_DIMS[model_type])
    else:
        parts = sam_decoder_parts(spec, image_size)
    return PromptDecoder(
        model_type=model_type, prompt_encoder=parts[0], mask_decoder=parts[1]
    ).eval()


def decoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``prompt_encoder.*`` and ``mask_decoder.*`` entries of a model's state dict."""
    return {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}


def load_prompt_decoder(
    model_type: str, image_size: int, state: Mapping[str, torch.Tensor], *, source: str
) -> PromptDecoder:
    """:func:`build_prompt_decoder` loaded with the decoder tensors of ``state`` (other entries,
    e.g. the image encoder's, are ignored), frozen (no parameter requires grad) and in eval
    mode. Every decoder tensor must be present with its shape; otherwise one UserError line
    naming ``source`` and the first differences."""
    model = build_prompt_decoder(model_type, image_size)
    own = model.state_dict()
    given = decoder_state(state)
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(
        k for k in set(own) & set(given) if tuple(own[k].shape) != tuple(given[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", shapes),
            )
            if keys
        ]
        raise UserError(
            f"{source}: the teacher's prompt encoder / mask decoder tensors do not fit "
            f"{model_type} at image_size {image_size}: {'; '.join(parts)}"
        )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in given.items()})
    model.requires_grad_(False)
    return model.eval()
