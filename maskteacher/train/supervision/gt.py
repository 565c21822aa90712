"""Ground-truth supervision: everything mode (Hungarian matching) and single mode (one object
per prompt)."""

from __future__ import annotations

import torch

from maskteacher.train.data.batch import Batch
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.base import StepContext, SupervisionOutput
from maskteacher.train.supervision.criterion import MaskCriterion, PairBatch
from maskteacher.train.supervision.matcher import MatchSettings
from maskteacher.train.supervision.pairs import (
    ImagePredictions,
    image_predictions,
    match_and_pair,
    pair_stats,
    task_terms,
)


class GTSupervision:
    """Everything mode: all predictions matched (Hungarian) against the ground-truth masks.

    criterion: the task criterion; match: the trainer's matching settings (``train.match_*``).
    """

    teacher_fields: frozenset[str] = frozenset()

    def __init__(self, *, criterion: MaskCriterion, match: MatchSettings) -> None:
        self.criterion = criterion
        self.match = match

    def against(
        self, images: list[ImagePredictions], targets: list[torch.Tensor], ctx: StepContext
    ) -> SupervisionOutput:
        """Match the predictions of a batch split by image to ``targets[i]`` ((M_i, L, L) bool:
        the ground truth here, replace_gt's improved set there) and compute the task terms."""
        matches, pairs = match_and_pair(
            images,
            targets,
            settings=self.match,
            image_size=ctx.image_size,
            generator=ctx.generator,
        )
        return SupervisionOutput(
            terms=task_terms(self.criterion, pairs, ctx),
            weights=dict(ctx.settings.loss_weights),
            stats=pair_stats(matches, len(images)),
            matches=matches,
        )

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        return self.against(image_predictions(preds, batch), batch.gt_masks, ctx)


class SingleSupervision:
    """Single mode: each prompt's target is the object it was drawn from.

    With multimask output the candidate with the highest IoU against the target is trained (the
    others get no loss), as in SAM's own training. ``cls`` has nothing to act on (every prediction
    has a target) and is 0.
    """

    teacher_fields: frozenset[str] = frozenset()

    def __init__(self, *, criterion: MaskCriterion) -> None:
        self.criterion = criterion

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        n, k = preds.iou_pred.shape
        targets = torch.stack(
            [batch.gt_masks[int(i)][int(t)] for i, t in zip(batch.prompt_image, batch.prompt_target)]
        ) if n else preds.logits.new_zeros((0, *preds.logits.shape[-2:]), dtype=torch.bool)  # fmt: skip
        with torch.no_grad():
            flat_p = (preds.logits.detach() > 0).flatten(2)  # (P, K, LL)
            flat_t = targets.flatten(1)[:, None, :]
            inter = (flat_p & flat_t).sum(-1).float()
            union = (flat_p | flat_t).sum(-1).float().clamp(min=1)
            best = (inter / union).argmax(dim=1)  # (P,)
        rows = torch.arange(n, device=preds.logits.device)
        pairs = PairBatch(
            logits=preds.logits[rows, best],
            iou_pred=preds.iou_pred[rows, best],
            targets=targets,
            unmatched_iou_pred=preds.iou_pred.new_zeros(0),
            rows=rows * k + best,
            head=preds.point_head,
        )
        terms = self.criterion(
            pairs, pair_count=ctx.reduce_count(n), unmatched_count=1.0, generator=ctx.generator
        )
        iou = (inter / union).max(dim=1).values if n else torch.zeros(0)
        stats = {
            "matched": float(n),
            "matched_iou_sum": float(iou.sum()),
            "images": float(batch.num_images),
        }
        return SupervisionOutput(terms=terms, weights=dict(ctx.settings.loss_weights), stats=stats)
