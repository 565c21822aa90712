"""The feature-distillation blocks (``distillation.<block>``) as plain data.

Each block is a frozen dataclass whose fields are its config sub-keys (``weight`` included) and
whose call turns one teacher's view of the batch (:class:`~.view.TeacherView`) into one loss
value. Class attributes say what it reads: ``fields`` (the teacher's cached fields),
``needs_tokens`` (the student's selected decoder tokens), and optionally (False when absent)
``needs_features`` (the student's mask tokens and prompt-conditioned embedding) and
``needs_decoder`` (the teacher's decoding of the batch's prompts). The blocks here:

- ``encoder_matching``: ``lambda_mse * MSE + lambda_kl * spatial KL(T)`` of the student's image
  embedding (B, C, E, E) against the teacher's, mean over images;
- ``attention_matching``: ``lambda * KL(T)`` of the attention-transfer maps, mean over images;
- ``relational_KD``: ``lambda * (dist_factor * RKD-distance + angle_factor * RKD-angle)`` of the
  spatially mean-pooled embeddings across the images of the micro-batch (per rank under DDP);
  it needs >= 3 images per micro-batch and is exactly 0 with fewer;
- ``decoder_matching``: for every student prediction matched to a teacher mask,
  ``lambda_mse * MSE + lambda_cos * (1 - cos) + lambda_kl * channel KL(T)`` of the student's
  mask-decoder output token against the teacher's token of that mask; averaged over the pairs of
  the mini-batch (count all-reduced under DDP). The pairs are the strategy's student <-> teacher
  matching when it made one for this teacher (replace_gt, dual_supervision), otherwise a
  Hungarian student <-> teacher matching on IoU with ``iou_threshold``.

The origin's four blocks (``encoder_patch``, ``prompt_embed``, ``decoder_mask_token``,
``dense_mask_logits``) are in :mod:`.prompt_blocks`.

:data:`BLOCKS` maps the config key to the class, in the order the terms are computed and added.
Adding a block is one class and one entry (and its config section). Student and teacher
embeddings or tokens of different shapes are an error naming both shapes -- never broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskteacher.train.distill import losses as dl
from maskteacher.train.distill.prompt_blocks import (
    DecoderMaskToken,
    DenseMaskLogits,
    EncoderPatch,
    PromptEmbed,
)
from maskteacher.train.distill.view import TeacherView, shape_error
from maskteacher.train.supervision.criterion import pair_normalizer
from maskteacher.train.supervision.pairs import image_predictions
from maskteacher.train.supervision.teacher_match import match_to_teacher, teacher_masks


@dataclass(frozen=True)
class EncoderMatching:
    lambda_mse: float
    lambda_kl: float
    temperature: float
    weight: float

    term = "encoder"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = False
    needs_decoder = False

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(B, C, E, E) embeddings -> () ``mean_b(lambda_mse * MSE + lambda_kl * KL)``."""
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error("encoder_matching", "image embedding", student, teacher, name)
        per_image = self.lambda_mse * dl.feature_mse(student, teacher)
        if self.lambda_kl:
            per_image = per_image + self.lambda_kl * dl.spatial_kl(
                student, teacher, temperature=self.temperature
            )
        return per_image.mean()

    def __call__(self, view: TeacherView) -> torch.Tensor:
        return self.loss(view.student_embedding, view.teacher_embedding, view.name)


@dataclass(frozen=True)
class AttentionMatching:
    lambda_: float
    temperature: float
    weight: float

    term = "attention"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = False
    needs_decoder = False

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(B, Cs, E, E), (B, Ct, E, E) embeddings -> () ``lambda * mean_b KL``."""
        if student.shape[2:] != teacher.shape[2:]:
            raise shape_error("attention_matching", "embedding grid", student, teacher, name)
        kl = dl.attention_kl(student, teacher, temperature=self.temperature)
        return self.lambda_ * kl.mean()

    def __call__(self, view: TeacherView) -> torch.Tensor:
        return self.loss(view.student_embedding, view.teacher_embedding, view.name)


@dataclass(frozen=True)
class RelationalKD:
    lambda_: float
    dist_factor: float
    angle_factor: float
    weight: float

    term = "relational"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = False
    needs_decoder = False

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(B, Cs, E, E), (B, Ct, E', E') embeddings -> () RKD of the spatially pooled vectors."""
        s = student.float().mean(dim=(2, 3))
        t = teacher.float().mean(dim=(2, 3))
        return self.lambda_ * (
            self.dist_factor * dl.rkd_distance(s, t) + self.angle_factor * dl.rkd_angle(s, t)
        )

    def __call__(self, view: TeacherView) -> torch.Tensor:
        return self.loss(view.student_embedding, view.teacher_embedding)


@dataclass(frozen=True)
class DecoderMatching:
    lambda_mse: float
    lambda_cos: float
    lambda_kl: float
    temperature: float
    weight: float
    iou_threshold: float

    term = "decoder"
    fields = frozenset({"logits", "tokens"})
    needs_tokens = True
    needs_features = False
    needs_decoder = False

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(N, C) matched token pairs -> (N,) ``lambda_mse * MSE + lambda_cos * (1 - cos) +
        lambda_kl * KL``."""
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error("decoder_matching", "decoder token", student, teacher, name)
        per_pair = self.lambda_mse * dl.token_mse(student, teacher)
        per_pair = per_pair + self.lambda_cos * dl.cosine_loss(student, teacher)
        if self.lambda_kl:
            per_pair = per_pair + self.lambda_kl * dl.channel_kl(
                student, teacher, temperature=self.temperature
            )
        return per_pair

    def __call__(self, view: TeacherView) -> torch.Tensor:
        images = image_predictions(view.preds, view.batch)
        matches = view.supervision.teacher_matches if view.from_batch else None
        if matches is None:
            masks = [
                teacher_masks(t.float_logits(), view.batch.input_hw[i])
                for i, t in enumerate(view.targets)
            ]
            matches = match_to_teacher(images, masks, iou_threshold=self.iou_threshold)
        s_tok, t_tok = [], []
        for img, t, m in zip(images, view.targets, matches):
            device = img.tokens.device
            s_tok.append(img.tokens.index_select(0, m.pred.to(device)))
            t_tok.append(t.tokens.to(device).index_select(0, m.target.to(device)))
        per_pair = self.pair_loss(torch.cat(s_tok), torch.cat(t_tok).float(), view.name)
        return per_pair.sum() / pair_normalizer(view.ctx.reduce_count(per_pair.shape[0]))


#: ``distillation.<key>`` -> block class, in the order the terms are computed and added.
BLOCKS: dict[str, type] = {
    "encoder_matching": EncoderMatching,
    "attention_matching": AttentionMatching,
    "relational_KD": RelationalKD,
    "decoder_matching": DecoderMatching,
    "encoder_patch": EncoderPatch,
    "prompt_embed": PromptEmbed,
    "decoder_mask_token": DecoderMaskToken,
    "dense_mask_logits": DenseMaskLogits,
}

__all__ = ["BLOCKS", "TeacherView", "shape_error"]
