"""Mask-teacher supervision: the ``replace_gt`` and ``dual_supervision`` strategies.

Both read the teacher's low-res logits from the batch (the cache, or the online teacher hook,
:mod:`maskteacher.train.data.online_teacher`); teacher masks are binarised inside the image
(:func:`~maskteacher.train.supervision.teacher_match.teacher_masks`), and a matched pair needs
IoU > 0 on top of the configured threshold (:mod:`.teacher_match`).

**replace_gt** (``mask_teacher.method: replace_gt``), per image:

1. Hungarian teacher <-> GT on the IoU of the masks; pairs with IoU >= ``iou_threshold`` are
   kept -- one GT replaces at most one teacher mask and vice versa;
2. the *improved teacher set*: the teacher's masks in the teacher's order, each kept one
   replaced by its GT mask;
3. Hungarian student <-> improved set with the trainer's matching settings (``train.match_*``,
   exactly as the GT path matches against GT) and the task losses (BCE / focal / dice / IoU /
   cls, :class:`~maskteacher.train.supervision.criterion.MaskCriterion`) against it. GT contributes
   nothing directly: a GT object no teacher mask found is not a target.

With ``gt_override: false`` (the origin's variant) nothing is replaced and the targets are the
teacher's *soft* masks ``q = sigmoid(teacher logit)`` (0 outside the image), GT ignored: the
student <-> teacher matching uses the binarised teacher masks, and on each pair BCE is
``-(q log p + (1 - q) log(1 - p))``, focal is torchvision's sigmoid focal loss with the
soft target (``p_t = p q + (1 - p)(1 - q)``, ``alpha_t = alpha q + (1 - alpha)(1 - q)``),
dice uses ``q`` in place of the binary mask, and the IoU term's actual IoU is that of
``student logit > 0`` with ``q >= 0.5`` (the binarised teacher mask); cls as usual.

Logged, not weighted: ``replaced`` -- teacher masks replaced by GT per image.

**dual_supervision**: the GT strategy itself (:class:`~.gt.GTSupervision`, the same numbers as
``gt``), and in parallel a Hungarian student <-> teacher on IoU (threshold
``mask_teacher.iou_threshold``). For each kept pair a pixel-wise soft loss between the student's
and the teacher's logits (``soft_loss.type``: ``l2``, ``kl`` or ``kl_teacher``,
:data:`~maskteacher.train.supervision.losses.SOFT_LOSSES`) over all low-res pixels (or ``train.loss_points``
sampled ones, like the task losses, decoded at those pixels only under point-sampled decoding),
averaged over the kept pairs of the mini-batch (count
all-reduced under DDP): ``soft = sum_pairs loss / pairs`` -- exactly 0 without pairs
(:func:`~maskteacher.train.supervision.criterion.pair_normalizer`).
It is the term ``soft`` with weight ``soft_loss.weight``: ``train/task_loss`` includes the
weighted term, ``train/soft`` logs the unweighted soft loss, the progress bar shows ``soft``.
Logged, not weighted: ``teacher_pairs`` -- kept student <-> teacher pairs per image.
"""

from __future__ import annotations

import torch

from maskteacher.train.data.batch import Batch
from maskteacher.train.student import PointHead, Predictions
from maskteacher.train.supervision import losses
from maskteacher.train.supervision.base import StepContext, SupervisionOutput
from maskteacher.train.supervision.criterion import (
    MaskCriterion,
    pair_normalizer,
    require_dense,
    sampled_logits,
)
from maskteacher.train.supervision.gt import GTSupervision
from maskteacher.train.supervision.matcher import Match, MatchSettings, match_batch
from maskteacher.train.supervision.pairs import (
    ImagePredictions,
    gather_pairs,
    image_predictions,
    match_and_pair,
    matched_rows,
    pair_stats,
    task_terms,
)
from maskteacher.train.supervision.teacher_match import (
    inside_image,
    match_to_teacher,
    overlapping,
    teacher_logits,
    teacher_masks,
)

# ----------------------------------------------------------------------------- replace_gt


@torch.no_grad()
def improved_teacher_sets(
    teacher: list[torch.Tensor], gt: list[torch.Tensor], *, iou_threshold: float
) -> tuple[list[torch.Tensor], list[Match]]:
    """Replace teacher masks by the GT masks they match (step 1-2 of replace_gt).

    teacher[i]: (N_i, L, L) bool teacher masks; gt[i]: (M_i, L, L) bool. Returns per image the
    (N_i, L, L) bool improved set (teacher order) and the teacher -> GT :class:`Match` used.
    """
    matches = match_batch(
        [t.float() for t in teacher], gt, settings=MatchSettings(iou_threshold=iou_threshold)
    )
    improved, kept = [], []
    for t, g, m in zip(teacher, gt, matches):
        m = overlapping(m)
        out = t.clone()
        if len(m):
            out[m.pred.to(t.device)] = g.index_select(0, m.target.to(g.device)).to(t.device)
        improved.append(out)
        kept.append(m)
    return improved, kept


def soft_teacher_targets(logits: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
    """(N, L, L) teacher logits -> (N, L, L) float ``sigmoid(logit)``, 0 outside the image."""
    inside = inside_image(input_hw, logits.shape[-1], logits.device)
    return torch.sigmoid(logits.float()) * inside


class ReplaceGTSupervision:
    """replace_gt (module docstring). criterion / match: the task criterion and the trainer's
    matching settings; iou_threshold: the teacher <-> GT threshold; gt_override: replace (True)
    or train on soft teacher masks (False)."""

    teacher_fields: frozenset[str] = frozenset({"logits"})

    def __init__(
        self,
        *,
        criterion: MaskCriterion,
        match: MatchSettings,
        iou_threshold: float,
        gt_override: bool = True,
    ) -> None:
        self.student = GTSupervision(criterion=criterion, match=match)
        self.iou_threshold = iou_threshold
        self.gt_override = gt_override

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        images = image_predictions(preds, batch)
        logits = teacher_logits(batch)
        masks = [teacher_masks(t, batch.input_hw[i]) for i, t in enumerate(logits)]
        replaced = 0
        if self.gt_override:
            targets, kept = improved_teacher_sets(
                masks, batch.gt_masks, iou_threshold=self.iou_threshold
            )
            replaced = sum(len(m) for m in kept)
            out = self.student.against(images, targets, ctx)
        else:
            s = self.student
            matches, _ = match_and_pair(
                images, masks, settings=s.match, image_size=ctx.image_size, generator=ctx.generator
            )
            soft = [soft_teacher_targets(t, batch.input_hw[i]) for i, t in enumerate(logits)]
            out = SupervisionOutput(
                terms=task_terms(s.criterion, gather_pairs(images, soft, matches), ctx),
                weights=dict(ctx.settings.loss_weights),
                stats=pair_stats(matches, batch.num_images),
                matches=matches,
            )
        out.terms["replaced"] = torch.tensor(replaced / max(batch.num_images, 1))
        out.teacher_matches = out.matches  # the improved set keeps the teacher's order
        return out


# ----------------------------------------------------------------------------- dual


def soft_pairs(
    images: list[ImagePredictions], teacher: list[torch.Tensor], matches: list[Match]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate matched (student, teacher) logits: two (N, L, L) tensors, and the student
    predictions' flat batch rows (N,) under point-sampled decoding (else None)."""
    s, t = [], []
    for img, logits, m in zip(images, teacher, matches):
        device = img.logits.device
        s.append(img.logits.index_select(0, m.pred.to(device)))
        t.append(logits.to(device).index_select(0, m.target.to(device)))
    return torch.cat(s), torch.cat(t), matched_rows(images, matches)


def soft_loss_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str,
    loss_points: int | None = None,
    generator: torch.Generator | None = None,
    rows: torch.Tensor | None = None,
    head: PointHead | None = None,
) -> torch.Tensor:
    """Sum over N pairs of the per-pair soft loss ``kind`` of (N, L, L) logits -> ().

    loss_points: evaluate on this many uniformly drawn pixels per pair (as the task losses);
    rows / head: under point-sampled decoding the student logits there are decoded by
    ``head`` for prediction ``rows`` (``student`` carries no gradient then).
    """
    s = student.flatten(1)
    t = teacher.flatten(1)
    if loss_points is not None and loss_points < s.shape[1]:
        idx = losses.sample_pixels(
            s.shape[1], loss_points, rows=s.shape[0], generator=generator, device=s.device
        )
        s, t = sampled_logits(student, idx, rows=rows, head=head), t.gather(1, idx)
    else:
        require_dense(head, "the soft loss on all pixels")
    return losses.SOFT_LOSSES[kind](s, t).sum()


class DualSupervision:
    """dual_supervision (module docstring): the GT strategy plus the soft teacher term.
    criterion / match: as the GT strategy; iou_threshold: student <-> teacher threshold;
    soft_type / soft_weight: ``soft_loss``."""

    teacher_fields: frozenset[str] = frozenset({"logits"})

    def __init__(
        self,
        *,
        criterion: MaskCriterion,
        match: MatchSettings,
        iou_threshold: float,
        soft_type: str = "l2",
        soft_weight: float = 0.5,
    ) -> None:
        if soft_type not in losses.SOFT_LOSSES:
            raise ValueError(
                f"unknown soft loss {soft_type!r}; expected one of {list(losses.SOFT_LOSSES)}"
            )
        self.gt = GTSupervision(criterion=criterion, match=match)
        self.iou_threshold = iou_threshold
        self.soft_type = soft_type
        self.soft_weight = soft_weight

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        images = image_predictions(preds, batch)
        out = self.gt.against(images, batch.gt_masks, ctx)
        logits = teacher_logits(batch)
        masks = [teacher_masks(t, batch.input_hw[i]) for i, t in enumerate(logits)]
        out.teacher_matches = match_to_teacher(images, masks, iou_threshold=self.iou_threshold)
        student, teacher, rows = soft_pairs(images, logits, out.teacher_matches)
        total = soft_loss_sum(
            student,
            teacher,
            kind=self.soft_type,
            loss_points=self.gt.criterion.loss_points,
            generator=ctx.generator,
            rows=rows,
            head=preds.point_head,
        )
        count = student.shape[0]
        out.terms["soft"] = total / pair_normalizer(ctx.reduce_count(count))
        out.terms["teacher_pairs"] = torch.tensor(count / max(batch.num_images, 1))
        out.weights["soft"] = self.soft_weight
        return out
