"""What a supervision strategy and an auxiliary loss receive and return.

A strategy (:data:`maskteacher.train.supervision.SUPERVISIONS`) is called once per micro-batch
as ``strategy(preds, batch, ctx) -> SupervisionOutput``; an auxiliary loss (feature
distillation) as ``aux(preds, batch, ctx, supervision) -> SupervisionOutput`` after it. Each
returns named terms with the weights that apply to them; the engine adds every weighted term in
one place (:func:`~maskteacher.train.supervision.criterion.weighted_total`). Both declare the
teacher fields they read (``teacher_fields``) so the data path loads only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from maskteacher.train.data.batch import Batch
from maskteacher.train.schedule import EpochSettings
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.matcher import Match


@dataclass
class StepContext:
    """Per-step information a strategy may use.

    settings: the epoch's resolved settings (loss weights, distillation switch, lambda_coef);
    generator: CPU generator seeded per step (loss-point sampling); reduce_count: turns a local
    count into the mean count per rank (sum all-reduced / world size; identity without DDP);
    image_size: S; epoch / step: position in training.
    """

    settings: EpochSettings
    generator: torch.Generator
    reduce_count: Callable[[float], float]
    image_size: int
    epoch: int = 0
    step: int = 0


@dataclass
class SupervisionOutput:
    """Named terms, the weights that apply to them, and plain-number stats for logging.

    stats keys used by the trainer: ``matched`` (pairs in this mini-batch), ``matched_iou_sum``
    (sum of the pairs' IoU), ``images``. matches: per image, the student <-> target pairs;
    teacher_matches: per image, the pairs (student prediction -> teacher mask index) the strategy
    matched against the batch's teacher, or None when it did not (feature distillation then
    matches on its own).
    """

    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    stats: dict[str, float] = field(default_factory=dict)
    matches: list[Match] | None = None
    teacher_matches: list[Match] | None = None


class SupervisionStrategy(Protocol):
    """A supervision strategy: built with plain keyword arguments, called per micro-batch."""

    teacher_fields: frozenset[str]

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput: ...


class AuxLoss(Protocol):
    """An extra loss block (feature distillation) run after the supervision strategy.

    teacher_fields: teacher fields it needs in the batch; needs_tokens: whether the student must
    return decoder tokens. Returns terms with their weights (it reads ``ctx.settings`` for the
    distillation switch and ``lambda_coef``).
    """

    teacher_fields: frozenset[str]
    needs_tokens: bool

    def __call__(
        self, preds: Predictions, batch: Batch, ctx: StepContext, supervision: SupervisionOutput
    ) -> SupervisionOutput: ...
