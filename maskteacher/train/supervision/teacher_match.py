"""Teacher masks as matching targets: binarising the teacher's logits, matching to them.

Shared by the mask-teacher strategies (:mod:`.mask_teacher`) and feature distillation
(:mod:`maskteacher.train.distill`). Everything lives in the low-res frame.

A teacher mask is ``logit > 0`` restricted to the low-res pixels that touch the image
(:func:`maskteacher.models.everything.valid_lowres_mask`): the decoder also answers in the
padding, where no object can be, and the ground truth is empty there.

A matched pair is a correspondence only when the two masks overlap: besides the configured IoU
threshold, pairs with IoU 0 are always dropped (with ``iou_threshold: 0`` the Hungarian
assignment would otherwise pair unrelated masks).
"""

from __future__ import annotations

import torch

from maskteacher.models.everything import valid_lowres_mask
from maskteacher.train.data.batch import Batch, TeacherTargets
from maskteacher.train.supervision.matcher import Match, MatchSettings, match_batch
from maskteacher.train.supervision.pairs import ImagePredictions


def teacher_targets(batch: Batch, field: str) -> list[TeacherTargets]:
    """The batch's teacher outputs, checking that ``field`` is there for every image."""
    if batch.teacher is None or any(getattr(t, field) is None for t in batch.teacher):
        raise RuntimeError(
            f"the batch carries no teacher {field}: the strategy declared it in teacher_fields, "
            "so the cache or the online teacher should have provided it"
        )
    return batch.teacher


def teacher_logits(batch: Batch) -> list[torch.Tensor]:
    """Per image (N_i, L, L) float32 teacher logits on the batch's device (dequantised)."""
    return [t.float_logits() for t in teacher_targets(batch, "logits")]


def inside_image(input_hw: torch.Tensor, low_res: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool: the low-res pixels that touch the image of unpadded size input_hw (2,)."""
    return valid_lowres_mask(input_hw.reshape(1, 2).to(device), low_res)[0]


def teacher_masks(logits: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
    """(N, L, L) logits of one image -> (N, L, L) bool masks inside the image (module docstring).

    input_hw: (2,) (h, w) of the unpadded input region.
    """
    return (logits > 0) & inside_image(input_hw, logits.shape[-1], logits.device)


def overlapping(match: Match) -> Match:
    """Drop pairs whose IoU is 0 (module docstring)."""
    keep = match.iou > 0
    if bool(keep.all()):
        return match
    return Match(match.pred[keep], match.target[keep], match.iou[keep])


def match_to_teacher(
    images: list[ImagePredictions], masks: list[torch.Tensor], *, iou_threshold: float
) -> list[Match]:
    """Hungarian student <-> teacher on the IoU of binarised masks, per image.

    masks[i]: (N_i, L, L) bool teacher masks. Pairs below ``iou_threshold`` (and IoU-0 pairs)
    are dropped. Returns per image a :class:`Match` (pred: flattened student prediction index,
    target: teacher mask index).
    """
    matches = match_batch(
        [img.logits.detach() for img in images],
        masks,
        settings=MatchSettings(iou_threshold=iou_threshold),
    )
    return [overlapping(m) for m in matches]
