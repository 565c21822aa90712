"""Feature distillation as an auxiliary loss: every enabled block, for every teacher.

:class:`FeatureDistillation` runs after the supervision strategy. For each teacher (the batch's
mask teacher, or a ``teachers[]`` entry read from its own cache by a :data:`TeacherSource`) and
each enabled block (:mod:`.blocks`, in :data:`~.blocks.BLOCKS` order), it adds the term
``kd/<teacher>/<block>`` with the weight ``lambda_coef * teacher weight * block weight``; the
epoch's ``stage_schedule`` may switch the whole thing off (``ctx.settings.distillation``) or
change ``lambda_coef`` (which ``distillation.dynamic_lambda`` may scale down). Losses are
computed in fp32 (outside autocast). A teacher whose blocks decode prompts carries its
:class:`~.teacher_decoder.TeacherDecoder`, run once per step on the batch's prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from maskteacher.train.data.batch import Batch, TeacherTargets
from maskteacher.train.distill.teacher_decoder import TeacherDecoder
from maskteacher.train.distill.view import TeacherView
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.base import StepContext, SupervisionOutput

#: A teacher's outputs for a batch: B :class:`TeacherTargets` on the batch's device.
TeacherSource = Callable[[Batch], list[TeacherTargets]]


def batch_teacher(batch: Batch) -> list[TeacherTargets]:
    """The batch's own teacher outputs (the mask teacher: cache or online)."""
    if batch.teacher is None:
        raise RuntimeError("the batch carries no teacher outputs (distillation declared them)")
    return batch.teacher


@dataclass
class KDTeacher:
    """One distillation teacher: name, weight, where its outputs come from, whether they are
    the batch's own teacher, and its decoder for the prompt-dependent blocks (None: none of
    the enabled blocks decodes prompts)."""

    name: str
    weight: float
    source: TeacherSource = batch_teacher
    from_batch: bool = True
    decoder: TeacherDecoder | None = None


class FeatureDistillation:
    """The distillation blocks as an :class:`~maskteacher.train.supervision.base.AuxLoss`.

    teachers: the teachers; blocks: the enabled block objects (:data:`~.blocks.BLOCKS` order);
    batch_fields: what the batch's own teacher must carry.
    """

    def __init__(
        self, *, teachers: list[KDTeacher], blocks: list, batch_fields: frozenset[str]
    ) -> None:
        self.teachers = teachers
        self.blocks = blocks
        self.teacher_fields = batch_fields
        self.needs_tokens = any(b.needs_tokens for b in blocks)
        self.needs_features = any(getattr(b, "needs_features", False) for b in blocks)
        missing = [t.name for t in teachers if t.decoder is None]
        if any(getattr(b, "needs_decoder", False) for b in blocks) and missing:
            raise ValueError(f"teachers {missing} have no decoder for the prompt blocks")

    def __call__(
        self, preds: Predictions, batch: Batch, ctx: StepContext, supervision: SupervisionOutput
    ) -> SupervisionOutput:
        if not ctx.settings.distillation:
            return SupervisionOutput(terms={}, weights={})
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        with torch.autocast(batch.images.device.type, enabled=False):
            for teacher in self.teachers:
                view = TeacherView(
                    name=teacher.name,
                    targets=teacher.source(batch),
                    from_batch=teacher.from_batch,
                    preds=preds,
                    batch=batch,
                    ctx=ctx,
                    supervision=supervision,
                    decoder=teacher.decoder,
                )
                for block in self.blocks:
                    key = f"kd/{teacher.name}/{block.term}"
                    terms[key] = block(view)
                    weights[key] = ctx.settings.lambda_coef * teacher.weight * block.weight
        return SupervisionOutput(terms=terms, weights=weights)
