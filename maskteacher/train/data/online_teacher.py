"""The mask teacher run online: a batch hook filling ``Batch.teacher`` on the device.

Used when the run needs teacher outputs and no cache is given (the builders decide, see
:func:`maskteacher.train.assemble.online_teacher`). :class:`OnlineTeacher` runs
:func:`maskteacher.models.everything.generate_everything` -- the function precompute uses, with
the same generation parameters -- under ``torch.no_grad()`` in eval mode on every device batch.
The teacher is a separate module: not wrapped by DDP, not compiled, not in the optimizer, its
parameters never require grad (:func:`build_online_teacher`).

Cached and online teachers give the same targets (up to the cache's logit codec): the online
teacher runs on the *unflipped* image and its logits and points are mirrored exactly as the
dataset mirrors cached ones (:func:`maskteacher.train.data.dataset.flip_teacher`), and with a
teacher prompt source it makes the prompts the dataset would have made, replaying each item's
generator from its key (:attr:`~maskteacher.train.data.batch.TrainSample.key`). When only the
image embedding is asked for (``provides == {"embedding"}``: distillation alone, e.g. in single
mode), only the image encoder runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from maskteacher.data import hflip_input
from maskteacher.models import build_sam
from maskteacher.models.everything import EverythingOutput, encode_images, generate_everything
from maskteacher.train.data.batch import Batch, TeacherTargets, TrainSample, collate
from maskteacher.train.data.dataset import flip_teacher, item_flip, item_rng
from maskteacher.train.data.prompts import EverythingPromptSpec

#: Fields an online teacher always provides (everything generate_everything returns).
MASK_FIELDS = frozenset({"logits", "points", "iou", "stability", "boxes"})


def build_online_teacher(
    model_type: str,
    checkpoint: str,
    *,
    image_size: int,
    strict: bool,
    device: torch.device,
    config_keys: tuple[str, str] = ("mask_teacher.teacher_type", "mask_teacher.strict"),
) -> torch.nn.Module:
    """The teacher in eval mode on ``device`` with every parameter frozen (config_keys: the keys
    a checkpoint error names); a SAM-HQ checkpoint for a SAM type builds the SAM-HQ teacher."""
    model = build_sam(
        model_type,
        checkpoint,
        image_size=image_size,
        strict=strict,
        config_keys=config_keys,
        detect_hq=True,
    )
    model.requires_grad_(False)
    return model.to(device).eval()


def _targets(out: EverythingOutput) -> TeacherTargets:
    return TeacherTargets(
        logits=out.logits,
        logit_scale=1.0,
        points=out.points,
        iou=out.iou,
        stability=out.stability,
        boxes=out.boxes,
        embedding=out.embedding,
        tokens=out.tokens,
    )


class OnlineTeacher:
    """Batch hook running the teacher on every device batch (module docstring).

    model: the teacher; generation: ``generate_everything`` keyword arguments; provides: the
    fields it fills (embedding / tokens only when asked); prompts: the prompt spec to apply
    after the teacher ran (a teacher prompt source) or None; hflip / seed: the dataset's, to
    replay each item's generator; image_size: S; logit_clip: clip the logits to
    +-logit_clip (None: keep them), as the int8 cache codec does.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        generation: dict[str, Any],
        provides: frozenset[str],
        prompts: EverythingPromptSpec | None = None,
        hflip: bool = False,
        seed: int = 0,
        image_size: int = 1024,
        logit_clip: float | None = None,
    ) -> None:
        self.model = model
        self.logit_clip = logit_clip
        self.generation = dict(generation)
        self.provides = frozenset(provides)
        self.prompts = prompts
        self.hflip = hflip
        self.seed = seed
        self.image_size = image_size

    def teacher_outputs(self, batch: Batch) -> list[TeacherTargets]:
        """B :class:`TeacherTargets` for the batch's images as they were flipped (on the
        teacher's device): the teacher sees the unflipped image, the outputs are mirrored."""
        hw = [tuple(int(v) for v in row) for row in batch.input_hw.tolist()]
        flipped = batch.flipped.tolist()
        images = batch.images
        if any(flipped):
            images = torch.stack(
                [hflip_input(img, hw[i]) if flipped[i] else img for i, img in enumerate(images)]
            )
        if not self.provides & MASK_FIELDS:  # the embedding alone: the image encoder only
            emb = encode_images(self.model, images, batch.input_hw, bf16=self.generation["bf16"])
            targets = [TeacherTargets(embedding=e) for e in emb]
            return [flip_teacher(t, hw[i]) if flipped[i] else t for i, t in enumerate(targets)]
        outs = generate_everything(
            self.model,
            images,
            batch.input_hw,
            batch.orig_hw,
            **self.generation,
            return_embedding="embedding" in self.provides,
            return_tokens="tokens" in self.provides,
        )
        if self.logit_clip is not None:
            for o in outs:
                o.logits = o.logits.clamp(-self.logit_clip, self.logit_clip)
        targets = [_targets(o) for o in outs]
        return [flip_teacher(t, hw[i]) if flipped[i] else t for i, t in enumerate(targets)]

    def __call__(self, batch: Batch) -> Batch:
        targets = self.teacher_outputs(batch)
        if batch.teacher is not None:  # keep fields loaded from elsewhere, fill ours
            targets = [_merge(old, new, self.provides) for old, new in zip(batch.teacher, targets)]
        batch = dataclasses.replace(batch, teacher=targets)
        if self.prompts is not None:
            batch = self.with_teacher_prompts(batch)
        return batch

    def with_teacher_prompts(self, batch: Batch) -> Batch:
        """The batch with each image's prompts made from its (new) teacher points, drawn from the
        item's generator exactly as the dataset draws them from cached points."""
        if len(batch.item_keys) != batch.num_images:
            raise RuntimeError("the batch has no item keys to replay its prompts from")
        device = batch.images.device
        samples = []
        for i, (index, epoch) in enumerate(batch.item_keys):
            rng = item_rng(self.seed, epoch, index)
            if item_flip(rng, self.hflip) != bool(batch.flipped[i]):
                raise RuntimeError(
                    f"image {batch.image_ids[i]!r}: replayed flip differs from the dataset's "
                    "(the hook's train.seed / train.hflip differ from the dataset's)"
                )
            input_hw = tuple(int(v) for v in batch.input_hw[i].tolist())
            orig_hw = tuple(int(v) for v in batch.orig_hw[i].tolist())
            teacher = batch.teacher[i]
            prompts = self.prompts.make(
                gt_masks=batch.gt_masks[i].cpu(),
                input_hw=input_hw,
                orig_hw=orig_hw,
                image_size=self.image_size,
                teacher=TeacherTargets(points=teacher.points.detach().float().cpu()),
                rng=rng,
            )
            samples.append(
                TrainSample(
                    image_id=batch.image_ids[i],
                    image=batch.images[i],
                    input_hw=input_hw,
                    orig_hw=orig_hw,
                    gt_masks=batch.gt_masks[i],
                    prompts=prompts,
                    flipped=bool(batch.flipped[i]),
                    teacher=teacher,
                    key=(index, epoch),
                )
            )
        return collate(samples).to(device)


def _merge(old: TeacherTargets, new: TeacherTargets, provides: frozenset[str]) -> TeacherTargets:
    values = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
    for name in provides:
        values[name] = getattr(new, name)
    if "logits" in provides:
        values["logit_scale"] = new.logit_scale
    return TeacherTargets(**values)
