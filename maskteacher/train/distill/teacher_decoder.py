"""A distillation teacher's prompt encoder + mask decoder, run for exactly the student's prompts.

The prompt-dependent blocks (``prompt_embed``, ``decoder_mask_token``, ``dense_mask_logits``)
compare the student's decoding of a prompt with the teacher's decoding of the same prompt. The
teacher's image encoder -- nearly all of its cost -- does not depend on the prompts, so its
embedding comes from the cache; :class:`TeacherDecoder` runs only the teacher's small decoder on
it, every step, for the batch's prompts (single mode: each object's points or box; everything
mode: the grid / GT / teacher points), under ``torch.no_grad()``, in eval mode and float32
(outside autocast). Its module is frozen, kept out of the optimizer and of DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from maskteacher.models.prompt_features import PromptDecoding, decode_prompt_batch
from maskteacher.train.data.batch import Batch


class TeacherDecoder:
    """model: the teacher's decoder (a :class:`~maskteacher.models.prompt_decoder.PromptDecoder`
    loaded from the cache or the checkpoint, or the full teacher when it runs online); its
    parameters must not require grad. multimask_output: the student's ``model.multimask_output``
    (the K masks compared are chosen the same way); chunk: prompts per decoder call."""

    def __init__(self, model: nn.Module, *, multimask_output: bool, chunk: int = 256) -> None:
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError("the teacher decoder's parameters must be frozen")
        self.model = model.eval()
        self.multimask_output = multimask_output
        self.chunk = chunk

    @property
    def is_hq(self) -> bool:
        """SAM-HQ's decoder: its masks also need the HQ features (not cached), so no logits."""
        return hasattr(self.model.mask_decoder, "hf_token")

    @property
    def width(self) -> int:
        return int(self.model.mask_decoder.transformer_dim)

    def __call__(self, batch: Batch, embeddings: torch.Tensor) -> PromptDecoding:
        """(B, C, E, E) teacher embeddings of the batch's images -> the teacher's decoding of
        the batch's P prompts (:class:`PromptDecoding`, float32, no grad)."""
        with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
            return decode_prompt_batch(
                self.model,
                embeddings.float(),
                points=batch.points,
                labels=batch.labels,
                boxes=batch.boxes,
                has_box=batch.has_box,
                prompt_image=batch.prompt_image,
                multimask_output=self.multimask_output,
                chunk=self.chunk,
            )
