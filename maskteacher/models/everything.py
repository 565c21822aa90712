"""Segment-everything generation with a SAM teacher, filtered on the device in the low-res frame.

:func:`generate_everything` is the one function that turns padded model-input images into the
teacher's everything-mode masks; ``maskteacher precompute`` writes its output to the cache, the
trainer's online-teacher mode and evaluation call it directly, so cached and online teachers are
the same computation.

What it computes (``SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` and
``min_mask_region_area=0``, minus the full-resolution work):

1. the image encoder once per image, batched over the images;
2. one positive point prompt per grid point (``points_per_side`` squared, the generator's grid
   in the model input frame, see :func:`maskteacher.data.point_grid`) or per given point,
   decoded ``points_per_batch`` prompts at a time *across* images (one
   :func:`~maskteacher.models.decode_points` call per chunk), with multimask output -- all of
   them (``strategy: grid``), or a sparse grid first and then only the grid points no
   confident mask covers (``strategy: hierarchical``, :mod:`maskteacher.models.strategies`);
3. per candidate mask: keep it if ``predicted IoU > pred_iou_thresh`` (only when the threshold
   is > 0), then if ``stability >= stability_score_thresh`` (only when > 0), stability being
   segment-anything's ``calculate_stability_score`` (mask threshold 0, ``offset``);
4. box NMS per image (torchvision ``batched_nms`` with the image as category, scores = predicted
   IoU, ``box_nms_thresh``), then optionally the ``max_masks_per_image`` best by predicted IoU.

Differences from the reference, by design: stability and boxes are computed on the low-res
logits (L = image_size / 4) instead of masks upsampled to the original image, and nothing is
RLE-encoded. Low-res pixels outside the image -- beyond ``lowres_valid_hw(input_hw) =
(ceil(h_in / 4), ceil(w_in / 4))``, i.e. blocks made only of padding -- are excluded from
stability and boxes (their logits count as -inf there); the returned logits are the decoder's
raw output everywhere, so upsampling them (:func:`lowres_to_masks`) gives exactly the masks the
reference would produce for the same prompt.

With a SAM-HQ model (:mod:`maskteacher.models.sam_hq`) step 1 also computes the HQ features
from the encoder's early feature map, and step 2 decodes with SAM-HQ's decoder
(:func:`~maskteacher.models.decode_hq.decode_points_hq`): one mask per prompt -- SAM's best
multimask candidate plus the HQ token's mask, or with ``hq_token_only`` the HQ mask alone, as
segment-anything-hq's ``SamAutomaticMaskGenerator`` does (default ``hq_token_only=False``).
``hq_token_only`` is ignored by SAM models. Box mapping and the valid region: :mod:`.lowres`.

Speed options that change no result beyond float rounding (so the cache header does not record
them, :data:`NOT_RECORDED`): ``sdpa`` (the ViT encoder's attention through SDPA,
:mod:`.attention`) and ``compile`` (``torch.compile`` of the per-chunk decoder call); ``bf16``
autocast is recorded. (The mask upscaling already runs on channels-last tensors: the
transformer's output, viewed in image layout, has that memory layout.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maskteacher.data.transforms import point_grid
from maskteacher.models.features import (
    ImageFeatures,
    autocast,
    decode_prompts,
    encode_features,
    encode_images,
    model_device,
    prompt_decoder,
)
from maskteacher.models.filtering import (
    EverythingOutput,
    Kept,
    filter_candidates,
    select_masks,
)
from maskteacher.models.hq import is_hq_model
from maskteacher.models.lowres import (
    lowres_boxes_to_original,
    lowres_to_masks,
    valid_lowres_mask,
)
from maskteacher.models.strategies import STRATEGIES

__all__ = [
    "GENERATOR",
    "EverythingOutput",
    "GenerationParams",
    "ImageFeatures",
    "autocast",
    "decode_prompts",
    "encode_features",
    "encode_images",
    "generate_everything",
    "lowres_boxes_to_original",
    "lowres_to_masks",
    "model_device",
    "valid_lowres_mask",
]

#: Recorded in cache headers: version of the generation semantics of this module.
GENERATOR = "maskteacher.everything/1"


@dataclass(frozen=True)
class GenerationParams:
    """Everything-mode settings of :func:`generate_everything` (the ``precompute`` config
    section's values; precompute, eval and the trainer's online teacher all read them here)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    max_masks_per_image: int | None = None
    multimask_output: bool = True
    hq_token_only: bool = False
    strategy: str = "grid"
    hierarchical_stride: int = 4
    hierarchical_logit_thresh: float = 8.5
    bf16: bool = False
    sdpa: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {sorted(STRATEGIES)}")

    @classmethod
    def from_config(cls, precompute: Any) -> GenerationParams:
        """From a ``precompute`` config section (any object with these attributes)."""
        return cls(**{f.name: getattr(precompute, f.name) for f in dataclasses.fields(cls)})

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate_everything``."""
        return dataclasses.asdict(self)

    def header_params(self, *, hq: bool = False) -> dict[str, Any]:
        """What the cache header records and a resumed / merged run must match: not the speed
        settings (:data:`NOT_RECORDED`); ``hq_token_only`` only for a SAM-HQ teacher (``hq``),
        the only kind it changes; the strategy only when it is not ``grid`` (so caches made
        before it existed, all grid, still match), with its parameters."""
        skip = set(NOT_RECORDED) | ({"hq_token_only"} if not hq else set())
        if self.strategy == "grid":
            skip |= {"strategy", *HIERARCHICAL_KEYS}
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        params["generator"] = GENERATOR
        params["mask_threshold"] = 0.0
        return params


#: Generation settings that change how the work is done, not what it gives (beyond float
#: rounding): never in the cache header.
NOT_RECORDED = ("points_per_batch", "sdpa", "compile")
#: The hierarchical strategy's own parameters (recorded with ``strategy: hierarchical``).
HIERARCHICAL_KEYS = ("hierarchical_stride", "hierarchical_logit_thresh")


@torch.no_grad()
def generate_everything(
    model: nn.Module,
    images: torch.Tensor | None,
    input_hw: torch.Tensor | Sequence[Sequence[int]],
    orig_hw: torch.Tensor | Sequence[Sequence[int]],
    *,
    return_embedding: bool = False,
    return_tokens: bool = False,
    points: Sequence[torch.Tensor] | None = None,
    image_embeddings: torch.Tensor | None = None,
    **settings: Any,
) -> list[EverythingOutput]:
    """Everything-mode teacher masks for a batch of images (see the module docstring).

    images: (B, 3, S, S) uint8, model input frame (resized, zero-padded bottom/right; e.g.
    :func:`maskteacher.data.to_model_input`), S = the model's image size. input_hw: (B, 2) (h, w)
    of the unpadded region; orig_hw: (B, 2) (H, W) of the original images (for boxes).
    points: optional per-image (n_i, 2) float (x, y) prompts in the model input frame, used
    instead of the ``points_per_side`` grid (``grid`` strategy only). image_embeddings: optional
    (B, C, E, E) encoder output to reuse (the encoder is then not run; ``images`` may be None;
    SAM models only: a SAM-HQ decoder also reads the encoder's early features). settings: the
    :class:`GenerationParams` fields (thresholds, ``strategy``, ``bf16``, the speed options),
    their defaults there. Runs under ``torch.no_grad()`` in eval mode (a model in train mode is
    switched to eval for the call and back); with ``bf16`` the encoder and decoder run under
    bfloat16 autocast, filtering always in float32. Returns one :class:`EverythingOutput` per
    image.
    """
    params = GenerationParams(**settings)
    if params.strategy != "grid" and points is not None:
        raise ValueError(f"strategy {params.strategy!r} decodes the grid; points need 'grid'")
    device = model_device(model)
    in_hw, og_hw = _as_hw(input_hw, "input_hw").to(device), _as_hw(orig_hw, "orig_hw").to(device)
    if og_hw.shape[0] != in_hw.shape[0]:
        raise ValueError(f"orig_hw has {og_hw.shape[0]} rows, input_hw {in_hw.shape[0]}")
    if points is not None and len(points) != in_hw.shape[0]:
        raise ValueError(f"points has {len(points)} entries for {in_hw.shape[0]} images")
    was_training = model.training
    model.eval()
    try:
        features = _features(
            model, images, in_hw, image_embeddings, bf16=params.bf16, sdpa=params.sdpa
        )
        prompts = _prompts(points, params.points_per_side, in_hw, device)
        kept, decoded = _decode(model, features, prompts, in_hw, params, return_tokens)
    finally:
        model.train(was_training)
    return select_masks(
        kept,
        in_hw.shape[0],
        in_hw,
        og_hw,
        image_embeddings=features.embeddings if return_embedding else None,
        return_tokens=return_tokens,
        box_nms_thresh=params.box_nms_thresh,
        max_masks_per_image=params.max_masks_per_image,
        low_res=int(features.embeddings.shape[-1]) * 4,
        token_dim=int(model.mask_decoder.transformer_dim),
        decoded_prompts=decoded,
    )


def _decode(
    model: nn.Module,
    features: ImageFeatures,
    prompts: tuple[torch.Tensor, torch.Tensor],
    input_hw: torch.Tensor,
    params: GenerationParams,
    return_tokens: bool,
) -> tuple[list[Kept], list[int]]:
    """Steps 2-3: decode the prompts the strategy picks, filter each chunk's candidates."""
    decode = prompt_decoder(
        model, features, multimask_output=params.multimask_output,
        hq_token_only=params.hq_token_only, return_tokens=return_tokens, bf16=params.bf16,
        compile=params.compile,
    )  # fmt: skip
    filters = {
        "pred_iou_thresh": params.pred_iou_thresh,
        "stability_score_thresh": params.stability_score_thresh,
        "stability_score_offset": params.stability_score_offset,
        "mask_threshold": float(model.mask_threshold),
    }

    def run(points: torch.Tensor, image: torch.Tensor) -> Kept:
        return filter_candidates(decode(points, image), points, image, input_hw, **filters)

    return STRATEGIES[params.strategy](
        run, *prompts, num_images=input_hw.shape[0], points_per_batch=params.points_per_batch,
        points_per_side=params.points_per_side, stride=params.hierarchical_stride,
        logit_thresh=params.hierarchical_logit_thresh,
    )  # fmt: skip


def _features(
    model: nn.Module,
    images: torch.Tensor | None,
    input_hw: torch.Tensor,
    image_embeddings: torch.Tensor | None,
    *,
    bf16: bool,
    sdpa: bool,
) -> ImageFeatures:
    """Encode ``images``, or wrap the given embeddings (SAM only)."""
    num_images = input_hw.shape[0]
    if image_embeddings is not None:
        if is_hq_model(model):
            raise ValueError(
                "image_embeddings cannot be reused with a SAM-HQ model: its decoder also reads "
                "the encoder's early features; pass the images"
            )
        return ImageFeatures(image_embeddings)
    if images is None or images.shape[0] != num_images:
        raise ValueError(f"images must be ({num_images}, 3, S, S)")
    return encode_features(model, images, input_hw, bf16=bf16, sdpa=sdpa)


def _as_hw(hw: torch.Tensor | Sequence[Sequence[int]], name: str) -> torch.Tensor:
    out = torch.as_tensor(hw, dtype=torch.long)
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2), got {tuple(out.shape)}")
    return out


def _prompts(
    points: Sequence[torch.Tensor] | None,
    points_per_side: int,
    input_hw: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All prompts of the batch: (P, 2) float32 points and (P,) long image index."""
    per_image = []
    for b, (h, w) in enumerate(input_hw.tolist()):
        if points is None:
            pts = torch.from_numpy(point_grid(points_per_side, (h, w)))
        else:
            pts = torch.as_tensor(points[b], dtype=torch.float32)
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise ValueError(f"points[{b}] must be (n, 2), got {tuple(pts.shape)}")
        per_image.append(pts.to(device, torch.float32))
    image = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(per_image)])
    return torch.cat(per_image), image.to(device)
