"""What a distillation block sees of one teacher for one micro-batch: :class:`TeacherView`.

The view holds the teacher's outputs for the batch's images (a :class:`TeacherTargets` per
image: the cache's embedding, tokens, ...), the student's predictions, and -- for the blocks
that depend on the prompts -- the teacher's decoding of exactly the student's prompts on its
cached embeddings (:attr:`TeacherView.teacher_decoding`), computed once per view, when a block
first asks for it, by the teacher's :class:`~.teacher_decoder.TeacherDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from maskteacher.errors import UserError
from maskteacher.models.prompt_features import PromptDecoding
from maskteacher.train.data.batch import Batch, TeacherTargets
from maskteacher.train.distill.teacher_decoder import TeacherDecoder
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.base import StepContext, SupervisionOutput


@dataclass
class TeacherView:
    """What a block sees of one teacher for one micro-batch.

    name: the teacher's name (for errors); targets: its B :class:`TeacherTargets`; from_batch:
    whether they are the batch's own teacher (whose matches the strategy may have made);
    decoder: the teacher's prompt encoder + mask decoder (None: no block decodes prompts).
    """

    name: str
    targets: list[TeacherTargets]
    from_batch: bool
    preds: Predictions
    batch: Batch
    ctx: StepContext
    supervision: SupervisionOutput
    decoder: TeacherDecoder | None = None

    @cached_property
    def student_embedding(self) -> torch.Tensor:
        """(B, C, E, E) float32."""
        return self.preds.embeddings.float()

    @cached_property
    def teacher_embedding(self) -> torch.Tensor:
        """(B, C', E', E') float32 on the student's device."""
        stacked = torch.stack([t.embedding for t in self.targets])
        return stacked.to(self.preds.embeddings.device).float()

    @cached_property
    def teacher_decoding(self) -> PromptDecoding:
        """The teacher's decoder run on its embeddings for the batch's P prompts (no grad)."""
        if self.decoder is None:
            raise RuntimeError(f"teacher {self.name!r} has no decoder (a block declared one)")
        return self.decoder(self.batch, self.teacher_embedding)

    def prompt_count(self) -> float:
        """The divisor of a sum over the batch's prompts: their count averaged over the DDP
        ranks (``ctx.reduce_count``), or 1 when there is no prompt anywhere."""
        count = self.ctx.reduce_count(self.batch.num_prompts)
        return float(count) if count > 0 else 1.0


def shape_error(block: str, what: str, student: torch.Tensor, teacher: torch.Tensor, name: str):
    return UserError(
        f"distillation.{block}: the student's {what} is {tuple(student.shape[1:])} but teacher "
        f"'{name}' gives {tuple(teacher.shape[1:])}; they must match (same channels and "
        "model.image_size) -- pick a student/teacher pair of equal width or disable the block"
    )
