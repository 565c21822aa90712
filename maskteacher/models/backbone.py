"""Which backbone a state dict holds: the image encoder's structure read from its keys
(family, blocks per stage, widths), compared with every registry entry's."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

from maskteacher.models.registry import SAM_BUILDERS


@dataclass(frozen=True)
class EncoderSignature:
    """Structure of an image encoder read from state-dict keys: family, blocks per stage, widths."""

    family: str  # "vit" (segment-anything ImageEncoderViT) or "tiny_vit"
    depths: tuple[int, ...]
    widths: tuple[int, ...]

    def describe(self) -> str:
        if self.family == "vit":
            return f"{self.depths[0]} encoder blocks of width {self.widths[0]}"
        depths = "/".join(map(str, self.depths))
        widths = "/".join(map(str, self.widths))
        return f"a TinyViT encoder with {depths} blocks per stage of widths {widths}"


ENCODER_PREFIX = "image_encoder."


def encoder_signature(shapes: Mapping[str, torch.Size | torch.Tensor]) -> EncoderSignature | None:
    """Signature of the image encoder in a state dict (values: tensors or shapes); None if none."""
    shapes = {k: (v.shape if isinstance(v, torch.Tensor) else v) for k, v in shapes.items()}
    vit_width = shapes.get(ENCODER_PREFIX + "patch_embed.proj.weight")
    if vit_width is not None:
        blocks = _indices(shapes, ENCODER_PREFIX + r"blocks\.(\d+)\.")
        return EncoderSignature("vit", (len(blocks),), (int(vit_width[0]),))
    stages = sorted(_indices(shapes, ENCODER_PREFIX + r"layers\.(\d+)\."))
    if not stages:
        return None
    depths, widths = [], []
    for s in stages:
        depths.append(len(_indices(shapes, ENCODER_PREFIX + rf"layers\.{s}\.blocks\.(\d+)\.")))
        conv = shapes.get(f"{ENCODER_PREFIX}layers.{s}.blocks.0.conv1.c.weight")
        norm = shapes.get(f"{ENCODER_PREFIX}layers.{s}.blocks.0.attn.norm.weight")
        widths.append(int(conv[1]) if conv is not None else int(norm[0]) if norm is not None else 0)
    return EncoderSignature("tiny_vit", tuple(depths), tuple(widths))


def _indices(keys: Iterable[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


@cache
def registry_signatures() -> dict[str, EncoderSignature | None]:
    """Encoder signature of every SAM entry (meta device; a SAM-HQ entry has its SAM type's)."""
    out: dict[str, EncoderSignature | None] = {}
    for name, builder in SAM_BUILDERS.items():
        with torch.device("meta"):
            model = builder(1024)
        out[name] = encoder_signature(model.state_dict())
    return out


def detect_backbone(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Registry name whose image encoder has the structure found in ``state_dict``, or None."""
    signature = encoder_signature(state_dict)
    if signature is None:
        return None
    return next((n for n, s in registry_signatures().items() if s == signature), None)
