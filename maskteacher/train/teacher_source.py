"""Where the mask teacher's outputs come from: the cache, or the teacher run online.

With ``mask_teacher.cache_path`` set, the DataLoader workers read the teacher's outputs with each
image (:mod:`maskteacher.train.cache_targets`) and the teacher model is never built; when
``mask_teacher.enable`` is on, :func:`check_teacher_source` first refuses a cache made by
another teacher or with other settings (:func:`~maskteacher.train.teacher_cache.check_cache_identity`).

Without it, and when the config needs teacher outputs (:func:`mask_teacher_fields`: the
mask-teacher strategies, ``train.prompt_source: teacher|teacher_grid``, or distillation from the
mask teacher), :func:`online_teacher_from_config` builds the teacher from ``teacher_type`` +
``checkpoint_path`` and returns an :class:`OnlineTeacher` batch hook: on each device batch it
runs :func:`maskteacher.models.everything.generate_everything` -- the function precompute uses,
with the same ``precompute`` parameters -- under ``torch.no_grad()`` in eval mode. The teacher
is a separate module: not wrapped by DDP, not compiled, not in the optimizer, its parameters
never require grad.

Cached and online teachers give the same targets (up to the cache's logit codec): the online
teacher runs on the *unflipped* image and its logits and points are mirrored exactly as the
dataset mirrors cached ones (:func:`maskteacher.train.data.flip_teacher`), and with a teacher
prompt source it makes the prompts the dataset would have made, replaying each item's generator
from its key (:attr:`~maskteacher.train.batch.TrainSample.key`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from maskteacher.config import Config
from maskteacher.data import hflip_input
from maskteacher.errors import UserError
from maskteacher.models import build_sam
from maskteacher.models.everything import EverythingOutput, GenerationParams, generate_everything
from maskteacher.train.batch import Batch, TeacherTargets, TrainSample, collate
from maskteacher.train.builders import prompt_spec_from_config
from maskteacher.train.data import EverythingPromptSpec, flip_teacher, item_flip, item_rng
from maskteacher.train.feature_kd import batch_teacher_fields
from maskteacher.train.supervision import get_supervision, strategy_name
from maskteacher.train.teacher_cache import TeacherIdentity, check_cache_identity, generation_params

log = logging.getLogger(__name__)

#: Fields an online teacher always provides (everything generate_everything returns).
MASK_FIELDS = frozenset({"logits", "points", "iou", "stability", "boxes"})


def mask_teacher_fields(cfg: Config) -> frozenset[str]:
    """Teacher fields this config needs from the mask teacher (empty: no teacher needed)."""
    name = strategy_name(
        mode=cfg.dataset.mode,
        mask_teacher_enabled=cfg.mask_teacher.enable,
        method=cfg.mask_teacher.method,
    )
    fields = set(get_supervision(name).teacher_fields)
    if cfg.dataset.mode == "everything" and prompt_spec_from_config(cfg).needs_teacher_points:
        fields.add("points")
    return frozenset(fields) | batch_teacher_fields(cfg)


def mask_teacher_identity(cfg: Config) -> TeacherIdentity:
    mt = cfg.mask_teacher
    return TeacherIdentity(
        where="mask_teacher.cache_path",
        teacher_type=mt.teacher_type,
        type_key="mask_teacher.teacher_type",
        checkpoint=mt.checkpoint_path,
        checkpoint_key="mask_teacher.checkpoint_path",
        image_size=cfg.model.image_size,
        generation=generation_params(cfg.precompute),
    )


def check_teacher_source(cfg: Config) -> None:
    """With a cache configured, refuse it unless it matches the mask_teacher block (module doc)."""
    if cfg.mask_teacher.cache_path is not None:
        check_cache_identity(cfg.mask_teacher.cache_path, mask_teacher_identity(cfg))


def generation_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``generate_everything`` from the ``precompute`` section."""
    return GenerationParams.from_config(cfg.precompute).generator_kwargs()


def build_online_teacher(
    model_type: str, checkpoint: str, *, image_size: int, strict: bool, device: torch.device
) -> torch.nn.Module:
    """The teacher in eval mode on ``device`` with every parameter frozen."""
    model = build_sam(
        model_type,
        checkpoint,
        image_size=image_size,
        strict=strict,
        config_keys=("mask_teacher.teacher_type", "mask_teacher.strict"),
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


def online_teacher_from_config(cfg: Config, device: torch.device) -> OnlineTeacher | None:
    """The online teacher hook when the config needs teacher outputs and has no cache."""
    needed = mask_teacher_fields(cfg)
    mt = cfg.mask_teacher
    if not needed or mt.cache_path is not None:
        return None
    if mt.checkpoint_path is None:
        raise UserError(
            f"mask_teacher.cache_path is not set and neither is mask_teacher.checkpoint_path: "
            f"this config needs teacher outputs ({', '.join(sorted(needed))}); set "
            "mask_teacher.cache_path to a cache made by maskteacher precompute, or "
            "mask_teacher.checkpoint_path to run the teacher online"
        )
    log.info(
        "no mask_teacher.cache_path: running teacher %s (%s) online on every batch",
        mt.teacher_type,
        mt.checkpoint_path,
    )
    model = build_online_teacher(
        mt.teacher_type,
        mt.checkpoint_path,
        image_size=cfg.model.image_size,
        strict=mt.strict,
        device=device,
    )
    spec = prompt_spec_from_config(cfg)
    teacher_prompts = cfg.dataset.mode == "everything" and spec.needs_teacher_points
    return OnlineTeacher(
        model,
        generation=generation_kwargs(cfg),
        provides=MASK_FIELDS | (needed & {"embedding", "tokens"}),
        prompts=spec if teacher_prompts else None,
        hflip=cfg.train.hflip,
        seed=cfg.train.seed,
        image_size=cfg.model.image_size,
        logit_clip=cfg.precompute.clip if cfg.precompute.codec == "int8" else None,
    )
