"""Telling SAM-HQ from SAM: by a checkpoint's keys, or by a built model's decoder.

A SAM-HQ checkpoint is a SAM checkpoint plus the HQ decoder's parameters
(:data:`HQ_DECODER_PREFIXES`: ``mask_decoder.hf_token`` / ``hf_mlp`` / ``compress_vit_feat`` /
``embedding_encoder`` / ``embedding_maskfeature``). A *teacher* configured with a SAM type
(``vit_h`` as in the users' spec, ``vit_l``, ``vit_b``, ``vit_t``, the tiny test types) and given
such a file is built as the type's SAM-HQ variant (:data:`~maskteacher.models.registry.HQ_VARIANTS`)
by :func:`maskteacher.models.build_sam`; a student is not (its strict loading names the extra keys).
Nothing here imports segment-anything-hq.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import nn

from maskteacher.models.checkpoint import read_state_dict
from maskteacher.models.registry import HQ_TYPES, HQ_VARIANTS

#: Key prefixes of the parameters MaskDecoderHQ adds to SAM's mask decoder.
HQ_DECODER_PREFIXES = tuple(
    f"mask_decoder.{name}."
    for name in (
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    )
)


def hq_keys(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that belong to the SAM-HQ decoder's extra parameters."""
    return [k for k in keys if k.startswith(HQ_DECODER_PREFIXES)]


def is_hq_type(model_type: str) -> bool:
    """True for the registry's SAM-HQ entries (``vit_h_hq``, ...)."""
    return model_type in HQ_TYPES


def is_hq_model(model: nn.Module) -> bool:
    """True when ``model``'s mask decoder is SAM-HQ's (it has the HQ output token)."""
    return hasattr(model.mask_decoder, "hf_token")


def hq_variant(model_type: str, state: Mapping[str, object]) -> str | None:
    """The SAM-HQ registry type to build for SAM type ``model_type`` given a checkpoint whose
    state dict is ``state``; None when the checkpoint has no HQ decoder or the type has no HQ
    variant (an HQ type already, or unknown)."""
    if model_type not in HQ_VARIANTS or not hq_keys(state):
        return None
    return HQ_VARIANTS[model_type]


def built_teacher_type(model_type: str, checkpoint: str | os.PathLike[str] | None) -> str:
    """The registry type a teacher of type ``model_type`` with ``checkpoint`` is built as: the
    SAM-HQ variant for a SAM type and a SAM-HQ checkpoint, else ``model_type`` (also when there
    is no checkpoint file). Reads only the checkpoint's keys (memory-mapped)."""
    if checkpoint is None or model_type not in HQ_VARIANTS or not os.path.isfile(checkpoint):
        return model_type
    return hq_variant(model_type, read_state_dict(checkpoint)) or model_type
