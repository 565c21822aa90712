"""The origin project's four distillation blocks (``distillation.<block>``) as plain data.

``encoder_patch`` compares image embeddings; the other three compare, prompt by prompt, the
student's decoding of the batch's prompts with the teacher's decoding of the *same* prompts on
its cached embedding (:attr:`~.view.TeacherView.teacher_decoding`). With P prompts in the
micro-batch (everything mode: grid / GT / teacher points; single mode: each object's points or
box), each block is one value:

- ``encoder_patch``: ``mean_b [w_l2 * MSE(s, t) + w_cos * (1 - cos(s, t))]`` over the (B, C, E, E)
  image embeddings, cos of each image's flattened embedding;
- ``prompt_embed``: ``mean_p [w_mse * MSE(n(s), n(t)) + w_cos * (1 - cos(s, t))]`` over the two-way
  transformer's image-side output (P, C, E, E) -- the prompt-conditioned image embedding the
  decoder upsamples into masks; ``n`` normalises each position's C-vector to unit length;
- ``decoder_mask_token``: ``mean_p w_kl * sum_t KL_T(t_t || s_t)`` over the 4 mask tokens' outputs
  (P, 4, C), each a temperature softmax over channels times ``T^2`` (a SAM-HQ teacher's fifth,
  HQ token has no student counterpart and is left out);
- ``dense_mask_logits``: ``mean_p mean_k [w_kl * KL + w_focal * focal]`` over the K low-res mask
  logits of each prompt (the same multimask choice on both sides): the per-pixel Bernoulli
  ``KL(sigmoid(t) || sigmoid(s))`` and the soft-target focal loss (:mod:`.losses`), each a mean
  over the L x L pixels.

Per-prompt sums are divided by the prompt count averaged over the DDP ranks, as the task terms
are. Where these differ from the origin's ``distill_losses.py`` on purpose: ``dense_mask_logits``
uses both outcomes of the Bernoulli KL and of the focal loss (the origin's ``kl_div(log p_s, p_t)``
and focal keep only the foreground term, which is lowered by predicting foreground everywhere);
``encoder_patch`` reads the image embedding (the cached one; the origin hooked an inner ViT-H
block through a learned 1x1 convolution); width mismatches are an error, not averaged away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskteacher.errors import UserError
from maskteacher.train.distill import losses as dl
from maskteacher.train.distill.view import TeacherView, shape_error


@dataclass(frozen=True)
class EncoderPatch:
    w_l2: float
    w_cos: float
    weight: float

    term = "encoder_patch"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = False
    needs_decoder = False

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(B, C, E, E) embeddings -> () ``mean_b(w_l2 * MSE + w_cos * (1 - cos))``."""
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error("encoder_patch", "image embedding", student, teacher, name)
        per_image = self.w_l2 * dl.feature_mse(student, teacher)
        per_image = per_image + self.w_cos * dl.flat_cosine_loss(student, teacher)
        return per_image.mean()

    def __call__(self, view: TeacherView) -> torch.Tensor:
        return self.loss(view.student_embedding, view.teacher_embedding, view.name)


@dataclass(frozen=True)
class PromptEmbed:
    w_mse: float
    w_cos: float
    weight: float

    term = "prompt_embed"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = True
    needs_decoder = True

    def per_prompt(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(P, C, E, E) prompt-conditioned embeddings -> (P,)."""
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error(
                "prompt_embed", "prompt-conditioned embedding", student, teacher, name
            )
        out = self.w_mse * dl.normalised_mse(student, teacher)
        return out + self.w_cos * dl.flat_cosine_loss(student, teacher)

    def __call__(self, view: TeacherView) -> torch.Tensor:
        teacher = view.teacher_decoding.image_tokens
        per = self.per_prompt(view.preds.image_tokens, teacher, view.name)
        return per.sum() / view.prompt_count()


@dataclass(frozen=True)
class DecoderMaskToken:
    w_kl: float
    temperature: float
    weight: float

    term = "decoder_mask_token"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = True
    needs_decoder = True

    def per_prompt(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(P, T, C) student and (P, T', C) teacher mask tokens (T' >= T) -> (P,)
        ``w_kl * sum_t KL_T``."""
        teacher = teacher[:, : student.shape[1]]
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error("decoder_mask_token", "mask tokens", student, teacher, name)
        p, t, c = student.shape
        kl = dl.channel_kl(
            student.reshape(p * t, c), teacher.reshape(p * t, c), temperature=self.temperature
        )
        return self.w_kl * kl.reshape(p, t).sum(1)

    def __call__(self, view: TeacherView) -> torch.Tensor:
        teacher = view.teacher_decoding.mask_tokens
        per = self.per_prompt(view.preds.mask_tokens, teacher, view.name)
        return per.sum() / view.prompt_count()


@dataclass(frozen=True)
class DenseMaskLogits:
    w_kl: float
    w_focal: float
    gamma: float
    weight: float

    term = "dense_mask_logits"
    fields = frozenset({"embedding"})
    needs_tokens = False
    needs_features = False
    needs_decoder = True

    def per_prompt(self, student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
        """(P, K, L, L) mask logits of the same prompts -> (P,)."""
        if student.shape[1:] != teacher.shape[1:]:
            raise shape_error("dense_mask_logits", "mask logits", student, teacher, name)
        s, t = student.flatten(0, 1), teacher.flatten(0, 1)
        per_mask = self.w_kl * dl.bernoulli_kl(s, t)
        per_mask = per_mask + self.w_focal * dl.soft_focal(s, t, gamma=self.gamma)
        return per_mask.reshape(student.shape[:2]).mean(1)

    def __call__(self, view: TeacherView) -> torch.Tensor:
        teacher = view.teacher_decoding.low_res_logits
        if teacher is None:
            raise UserError(
                f"distillation.dense_mask_logits: teacher '{view.name}' is SAM-HQ, whose masks "
                "also need the HQ features of its image encoder, which the cache does not hold; "
                "disable the block for this teacher"
            )
        per = self.per_prompt(view.preds.logits, teacher, view.name)
        return per.sum() / view.prompt_count()
