"""Builders: the one place the trainer reads the Config.

:func:`bind` turns a :class:`~maskteacher.config.Config` into a
:class:`~maskteacher.train.plan.RunPlan` -- every setting as a plain value, and every part that
needs no file (strategy, distillation blocks, prompt specs, epoch plan, which teacher fields the
run needs and whether the cache or an online teacher provides them) -- without opening a file;
a test binds every shipped config. :mod:`maskteacher.train.assemble` then opens what the plan
names. The parts themselves take keyword arguments and never see the Config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from maskteacher.config import Config, DatasetConfig, resolve_teacher_type, teacher_weights
from maskteacher.errors import UserError
from maskteacher.models import HQ_TYPES, SAM_TYPES
from maskteacher.models.everything import GenerationParams
from maskteacher.train.data.online_teacher import MASK_FIELDS
from maskteacher.train.data.prompts import EverythingPromptSpec, SinglePromptSpec, SingleSettings
from maskteacher.train.data.teacher_cache import TeacherIdentity
from maskteacher.train.distill.blocks import BLOCKS
from maskteacher.train.engine import LoopSettings
from maskteacher.train.plan import (
    DataSpec,
    ImageSource,
    KDTeacherSpec,
    OnlineTeacherSpec,
    RunPlan,
    RunSettings,
    refuse_silent_epochs,
)
from maskteacher.train.schedule import EpochPlan, Freeze, LambdaPlateau, Stage
from maskteacher.train.student import use_point_decoding
from maskteacher.train.supervision import build_strategy, strategy_name
from maskteacher.train.supervision.base import SupervisionStrategy
from maskteacher.train.supervision.criterion import MaskCriterion
from maskteacher.train.supervision.matcher import MatchSettings
from maskteacher.train.visual import VisualSettings

log = logging.getLogger(__name__)

#: Name of the distillation teacher when there are no ``teachers`` entries (the mask teacher).
MASK_TEACHER = "mask_teacher"


def bind(cfg: Config) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` (no file is opened; config-level errors are UserErrors)."""
    strategy = _strategy(cfg)
    blocks = _kd_blocks(cfg)
    teachers = _kd_teachers(cfg) if blocks else []
    prompts = prompt_spec(cfg)
    fields = set(strategy.teacher_fields)
    if cfg.dataset.mode == "everything" and prompts.needs_teacher_points:
        fields.add("points")
    if any(t.cache_path is None for t in teachers):
        fields |= frozenset().union(*(b.fields for b in blocks))
    online = None
    if fields and cfg.mask_teacher.cache_path is None:
        online = _online_teacher(cfg, frozenset(fields), prompts)
        if prompts.needs_teacher_points:
            prompts = dataclasses.replace(prompts, defer_teacher_points=True)
    epochs = epoch_plan(cfg)
    _check_losses(cfg, epochs, strategy, blocks, teachers)
    return RunPlan(
        settings=run_settings(cfg),
        epochs=epochs,
        strategy=strategy,
        prompts=prompts,
        val_prompts=prompt_spec(cfg, validation=True),
        data=data_spec(
            cfg, check_identity=bool(strategy.teacher_fields), required=bool(fields) and not online
        ),
        teacher_fields=frozenset(fields),
        online=online,
        kd_blocks=blocks,
        kd_teachers=teachers,
        visual=visual_settings(cfg),
        config=cfg.to_dict(),
        config_text=cfg.to_yaml(),
        lambda_plateau=_lambda_plateau(cfg, blocks),
    )


def _online_teacher(cfg: Config, fields: frozenset[str], prompts) -> OnlineTeacherSpec:
    mt = cfg.mask_teacher
    if mt.checkpoint_path is None:
        raise UserError(
            f"mask_teacher.cache_path is not set and neither is mask_teacher.checkpoint_path: "
            f"this config needs teacher outputs ({', '.join(sorted(fields))}); set "
            "mask_teacher.cache_path to a cache made by maskteacher precompute, or "
            "mask_teacher.checkpoint_path to run the teacher online"
        )
    teacher_prompts = cfg.dataset.mode == "everything" and prompts.needs_teacher_points
    return OnlineTeacherSpec(
        teacher_type=mt.teacher_type,
        checkpoint=mt.checkpoint_path,
        strict=mt.strict,
        generation=GenerationParams.from_config(cfg.precompute).generator_kwargs(),
        # an embedding alone needs only the image encoder, not the everything-mode masks
        provides=(MASK_FIELDS if fields - {"embedding"} else frozenset())
        | (fields & {"embedding", "tokens"}),
        prompts=prompts if teacher_prompts else None,
        logit_clip=cfg.precompute.clip if cfg.precompute.codec == "int8" else None,
    )


def _images(d: DatasetConfig, path: str | None, key: str) -> ImageSource | None:
    if path is None:
        return None
    return ImageSource(
        path=path,
        key=key,
        format=d.format,
        skip_bad=d.skip_bad,
        image_root=d.image_root,
        include_crowd=d.include_crowd,
    )


def _identity(
    cfg: Config, section: str, teacher_type: str, checkpoint: str | None, *, type_key: str
) -> TeacherIdentity:
    """What a teacher cache named by ``section`` must have been made with."""
    ckpt_key = "checkpoint_path" if section == "mask_teacher" else "checkpoint"
    return TeacherIdentity(
        where=f"{section}.cache_path",
        teacher_type=teacher_type,
        type_key=f"{section}.{type_key}",
        checkpoint=checkpoint,
        checkpoint_key=f"{section}.{ckpt_key}",
        image_size=cfg.model.image_size,
        generation=GenerationParams.from_config(cfg.precompute),
        codec=cfg.precompute.codec,
        clip=cfg.precompute.clip,
    )


def data_spec(cfg: Config, *, check_identity: bool, required: bool) -> DataSpec:
    """The data section of the plan; check_identity: the mask-teacher strategy reads the cache,
    which must then match the ``mask_teacher`` block (with the mask teacher off, teacher prompts
    or distillation read whatever teacher made the cache); required: the run reads teacher
    outputs from the cache (see :class:`~maskteacher.train.plan.DataSpec`)."""
    d, t, mt = cfg.dataset, cfg.train, cfg.mask_teacher
    identity = None
    if check_identity and mt.cache_path is not None:
        identity = _identity(
            cfg, "mask_teacher", mt.teacher_type, mt.checkpoint_path, type_key="teacher_type"
        )
    return DataSpec(
        train=_images(d, d.train_dataset, "dataset.train_dataset"),
        val=_images(d, d.val_dataset, "dataset.val_dataset"),
        image_size=cfg.model.image_size,
        batch_size=t.batch_size,
        num_workers=d.num_workers,
        hflip=t.hflip,
        seed=t.seed,
        cache_path=mt.cache_path,
        verify_on_open=cfg.cache.verify_on_open,
        cache_required=required,
        identity=identity,
        empty_teacher_limit=None if mt.allow_empty_teacher or not check_identity else 0.5,
    )


def run_settings(cfg: Config) -> RunSettings:
    m, t = cfg.model, cfg.train
    if m.type in HQ_TYPES:  # its encoder returns (embedding, features): not a student
        raise UserError(
            f"model.type: {m.type} is a SAM-HQ model, a teacher (mask_teacher.teacher_type) or a "
            f"model to evaluate, not a student; train one of {', '.join(SAM_TYPES)}"
        )
    return RunSettings(
        model_type=m.type,
        checkpoint=m.checkpoint_path,
        strict=m.strict,
        image_size=m.image_size,
        multimask_output=m.multimask_output,
        save_dir=Path(m.save_path),
        resume=t.resume,
        epochs=t.epochs,
        seed=t.seed,
        lr=t.lr,
        weight_decay=t.weight_decay,
        encoder_lr_scale=t.encoder_lr_scale,
        warmup_steps=t.warmup_step,
        min_lr_ratio=t.min_lr_ratio,
        batch_size=t.batch_size,
        points_per_batch=t.points_per_batch,
        checkpoint_decoder=t.checkpoint_decoder,
        point_decoding=use_point_decoding(t.point_decoding, t.loss_points, m.image_size),
        compile=t.compile,
        log_every=t.log_every,
        val_freq=t.val_freq,
        early_stop_patience=t.early_stop_patience,
        batchnorm_eval=cfg.freeze.batchnorm_eval,
        loop=LoopSettings(
            gradient_accumulation=t.gradient_accumulation,
            grad_clip=t.grad_clip,
            bf16=t.bf16,
            checkpoint_every=t.checkpoint_every,
        ),
    )


def epoch_plan(cfg: Config) -> EpochPlan:
    f = cfg.freeze
    stages = tuple(
        Stage(
            name=s.name,
            start=s.start_epoch,
            end=cfg.train.epochs if s.end_epoch is None else s.end_epoch,
            loss_weights=dict(s.loss_weights or {}),
            distillation=s.distillation,
            lambda_coef=s.lambda_coef,
        )
        for s in cfg.stage_schedule
    )
    return EpochPlan(
        loss_weights=dataclasses.asdict(cfg.train.loss_weights),
        distillation=cfg.distillation.enable,
        lambda_coef=cfg.distillation.lambda_coef,
        stages=stages,
        freeze=Freeze(
            image_encoder=f.freeze_image_encoder,
            prompt_encoder=f.freeze_prompt_encoder,
            mask_decoder=f.freeze_mask_decoder,
            unfreeze_epoch=f.unfreeze_epoch,
        ),
    )


def _strategy(cfg: Config) -> SupervisionStrategy:
    t, mt = cfg.train, cfg.mask_teacher
    name = strategy_name(mode=cfg.dataset.mode, mask_teacher_enabled=mt.enable, method=mt.method)
    return build_strategy(
        name,
        criterion=MaskCriterion(loss_points=t.loss_points),
        match=MatchSettings(
            iou_threshold=t.match_iou_threshold,
            requires_point=t.match_requires_point,
            cost_dice=t.match_cost_dice,
            cost_bce=t.match_cost_bce,
            num_points=t.match_points,
        ),
        iou_threshold=mt.iou_threshold,
        gt_override=mt.gt_override,
        soft_type=mt.soft_loss.type,
        soft_weight=mt.soft_loss.weight,
    )


def prompt_spec(
    cfg: Config, *, validation: bool = False
) -> EverythingPromptSpec | SinglePromptSpec:
    """Training prompts per the config; validation always uses the full grid."""
    d, t = cfg.dataset, cfg.train
    if validation:
        return EverythingPromptSpec(source="grid", grid_points=d.grid_points, max_prompts=None)
    if d.mode == "single":
        return SinglePromptSpec(
            SingleSettings(
                mode=d.prompt_mode,
                min_points=d.min_points,
                max_points=d.max_points,
                max_bbox_shift=d.max_bbox_shift,
                max_prompts=t.max_prompts,
            )
        )
    return EverythingPromptSpec(
        source=t.prompt_source, grid_points=d.grid_points, max_prompts=t.max_prompts
    )


def _kd_blocks(cfg: Config) -> list:
    """The enabled distillation blocks (:data:`BLOCKS` order); [] when distillation never runs
    (neither ``distillation.enable`` nor a stage turns it on)."""
    d = cfg.distillation
    if not (d.enable or any(s.distillation for s in cfg.stage_schedule)):
        return []
    offered = {"iou_threshold": cfg.mask_teacher.iou_threshold}
    blocks = []
    for key, cls in BLOCKS.items():
        section = getattr(d, key)
        if section.enable:
            names = [f.name for f in dataclasses.fields(cls)]
            values = {**dataclasses.asdict(section), **offered}
            blocks.append(cls(**{n: values[n] for n in names}))
    if not blocks:
        log.warning("distillation is enabled but none of its blocks is; it adds nothing")
        return []
    types = [(f"teachers[{i}].type", t.type) for i, t in enumerate(cfg.teachers)] or [
        ("mask_teacher.teacher_type", cfg.mask_teacher.teacher_type)
    ]
    hq = [f"{k} = {v}" for k, v in types if v in HQ_TYPES and d.dense_mask_logits.enable]
    refusals = {
        "train.hflip: true cannot be combined with feature distillation: the teacher's cached "
        "image embedding and tokens describe the unflipped image; set train.hflip: false or "
        "turn distillation off": cfg.train.hflip,
        "train.checkpoint_decoder: true cannot be combined with distillation.prompt_embed / "
        "decoder_mask_token: they read the decoder's activations, which checkpointing discards; "
        "set train.checkpoint_decoder: false": cfg.train.checkpoint_decoder
        and any(getattr(b, "needs_features", False) for b in blocks),
        f"distillation.dense_mask_logits cannot use the SAM-HQ teacher {', '.join(hq)}: its "
        "masks also need the HQ features of its image encoder, which a cache does not hold; "
        "disable the block or distil from a SAM teacher": bool(hq),
    }
    for message, refused in refusals.items():
        if refused:
            raise UserError(message)
    if d.relational_KD.enable and cfg.train.batch_size < 3:
        log.warning(
            "distillation.relational_KD needs >= 3 images per micro-batch; with "
            "train.batch_size %d it is 0",
            cfg.train.batch_size,
        )
    return blocks


def _same_path(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _kd_teachers(cfg: Config) -> list[KDTeacherSpec]:
    """Without ``teachers`` entries the one teacher is the mask teacher (the batch's); each
    entry is a teacher with its own cache, unless that cache is the mask teacher's."""
    mt_ckpt = cfg.mask_teacher.checkpoint_path
    if not cfg.teachers:
        return [KDTeacherSpec(MASK_TEACHER, 1.0, checkpoint=mt_ckpt)]
    out = []
    for index, (entry, weight) in enumerate(zip(cfg.teachers, teacher_weights(cfg.teachers))):
        if not entry.cache_path:
            raise UserError(
                f"teachers '{entry.name}': cache_path is not set; feature distillation reads "
                f"this teacher's outputs from its cache (maskteacher precompute CONFIG --teacher "
                f"{entry.name} writes it)"
            )
        ckpt_key = f"teachers[{index}].checkpoint"
        if _same_path(entry.cache_path, cfg.mask_teacher.cache_path):
            own = entry.checkpoint is not None
            ckpt = (
                (entry.checkpoint, ckpt_key) if own else (mt_ckpt, "mask_teacher.checkpoint_path")
            )
            out.append(KDTeacherSpec(entry.name, weight, None, None, *ckpt))
            continue
        section, kind = f"teachers[{index}]", resolve_teacher_type(entry)
        identity = _identity(cfg, section, kind, entry.checkpoint, type_key="type")
        spec = (entry.name, weight, entry.cache_path, identity, entry.checkpoint, ckpt_key)
        out.append(KDTeacherSpec(*spec))
    return out


def _lambda_plateau(cfg: Config, blocks: list) -> LambdaPlateau | None:
    dyn = cfg.distillation.dynamic_lambda
    key = "distillation.dynamic_lambda.enable_plateau_scheduler"
    if dyn.enable_plateau_scheduler and not cfg.dataset.val_dataset:
        raise UserError(f"{key} is true but dataset.val_dataset is not set: it needs validation")
    if dyn.enable_plateau_scheduler and not blocks:
        raise UserError(f"{key} is true but no distillation block ever runs: nothing to scale")
    return LambdaPlateau(dyn.patience, dyn.factor) if dyn.enable_plateau_scheduler else None


def _check_losses(cfg: Config, epochs: EpochPlan, strategy, blocks: list, teachers) -> None:
    """Refuse a run with an epoch range whose loss has no term with a non-zero weight."""
    single = cfg.dataset.mode == "single"  # single mode has no unmatched prediction: no cls
    refuse_silent_epochs(
        epochs, cfg.train.epochs,
        task_terms=tuple(k for k in epochs.loss_weights if not (single and k == "cls")),
        always=getattr(strategy, "soft_weight", 0.0) > 0,
        kd=any(b.weight > 0 for b in blocks) and any(t.weight > 0 for t in teachers),
        blocks=bool(blocks),
    )  # fmt: skip


def visual_settings(cfg: Config) -> VisualSettings | None:
    """None when ``visual.status`` is off; a UserError when there is nothing to draw. In both
    dataset modes the pictures show the student's everything-mode masks (grid prompts), as
    validation measures them."""
    v = cfg.visual
    if not v.status:
        return None
    if not cfg.dataset.val_dataset:
        raise UserError(
            "visual.status is true but dataset.val_dataset is not set: the overlays are "
            "drawn from validation images"
        )
    return VisualSettings(
        folder=Path(v.save_path) if v.save_path else Path(cfg.model.save_path) / "visual",
        every=v.save_every_n_epochs,
        num_images=v.num_images,
        iou_threshold=v.IOU_threshold,
        points_per_side=cfg.dataset.grid_points,
        points_per_batch=cfg.train.points_per_batch,
        box_nms_thresh=cfg.precompute.box_nms_thresh,
        multimask_output=cfg.model.multimask_output,
        bf16=cfg.train.bf16,
    )
