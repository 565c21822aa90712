"""The run plan: everything a training run is, as plain values (no Config, no open file).

:func:`maskteacher.train.builders.bind` makes a :class:`RunPlan` from the Config;
:mod:`maskteacher.train.assemble` opens what it names (datasets, caches, teacher weights) and
:mod:`maskteacher.train.run` drives the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskteacher.errors import UserError
from maskteacher.train.data.prompts import EverythingPromptSpec, PromptSpec
from maskteacher.train.data.teacher_cache import TeacherIdentity
from maskteacher.train.engine import LoopSettings
from maskteacher.train.schedule import EpochPlan, LambdaPlateau
from maskteacher.train.supervision.base import SupervisionStrategy
from maskteacher.train.visual import VisualSettings


@dataclass(frozen=True)
class RunSettings:
    """The run's plain settings (``model.*``, ``train.*``, ``freeze.batchnorm_eval``)."""

    model_type: str
    checkpoint: str | None
    strict: bool
    image_size: int
    multimask_output: bool
    save_dir: Path
    resume: bool | str
    epochs: int
    seed: int
    lr: float
    weight_decay: float
    encoder_lr_scale: float
    warmup_steps: int
    min_lr_ratio: float
    batch_size: int
    points_per_batch: int
    checkpoint_decoder: bool
    point_decoding: bool
    compile: bool
    log_every: int
    val_freq: int
    early_stop_patience: int
    batchnorm_eval: bool
    loop: LoopSettings


@dataclass(frozen=True)
class ImageSource:
    """A dataset to open (arguments of :func:`maskteacher.data.open_dataset`); key: the config
    key naming it, for errors."""

    path: str
    key: str
    format: str | None = None
    skip_bad: bool = False
    image_root: str | None = None
    include_crowd: bool = False


@dataclass(frozen=True)
class DataSpec:
    """Where the images, ground truth and the mask teacher's cache are, and how to load them.

    cache_path: ``mask_teacher.cache_path`` (None: GT from the dataset); cache_required: the
    run reads teacher outputs from the cache -- otherwise (``mask_teacher.enable: false`` and
    nothing else reading the teacher) the cache only replaces the dataset's ground truth when
    it exists and matches, and the dataset is read if not; verify_on_open:
    ``cache.verify_on_open`` (each shard's checksums, lazily at its first read); identity: what
    the cache must have been made with when the mask-teacher strategy reads it (None: not
    checked); empty_teacher_limit: refuse a cache whose teacher kept no mask on more than this
    fraction of the images (None: not checked -- the mask teacher is off, or
    ``mask_teacher.allow_empty_teacher``).
    """

    train: ImageSource | None
    val: ImageSource | None
    image_size: int
    batch_size: int
    num_workers: int
    hflip: bool
    seed: int
    cache_path: str | None
    verify_on_open: bool
    cache_required: bool = True
    identity: TeacherIdentity | None = None
    empty_teacher_limit: float | None = None


@dataclass(frozen=True)
class OnlineTeacherSpec:
    """The mask teacher run online (no cache): the model and the hook's arguments."""

    teacher_type: str
    checkpoint: str
    strict: bool
    generation: dict[str, Any]
    provides: frozenset[str]
    prompts: EverythingPromptSpec | None
    logit_clip: float | None


@dataclass(frozen=True)
class KDTeacherSpec:
    """A distillation teacher: its name, weight, and its own cache (None: the batch's teacher,
    read with the batch) with what that cache must have been made with; checkpoint /
    checkpoint_key: the teacher's weights file and its config key -- where the prompt-dependent
    blocks take its decoder from when its cache holds none."""

    name: str
    weight: float
    cache_path: str | None = None
    identity: TeacherIdentity | None = None
    checkpoint: str | None = None
    checkpoint_key: str = "mask_teacher.checkpoint_path"


@dataclass
class RunPlan:
    """What a run is, decided from the config alone.

    teacher_fields: the fields the batch's (mask) teacher must carry -- the strategy's, the
    teacher prompt source's ``points`` and distillation's; online: the online teacher that
    provides them when no cache is configured (None: the cache provides them, if any are
    needed); kd_blocks: the enabled distillation blocks (empty: none); lambda_plateau:
    ``distillation.dynamic_lambda`` (None: off); config / config_text: the resolved config as
    plain data and as YAML (kept with checkpoints and in the run folder).
    """

    settings: RunSettings
    epochs: EpochPlan
    strategy: SupervisionStrategy
    prompts: PromptSpec
    val_prompts: PromptSpec
    data: DataSpec
    teacher_fields: frozenset[str]
    online: OnlineTeacherSpec | None
    kd_blocks: list
    kd_teachers: list[KDTeacherSpec]
    visual: VisualSettings | None
    config: dict[str, Any]
    config_text: str
    lambda_plateau: LambdaPlateau | None = None


def refuse_silent_epochs(
    epochs: EpochPlan,
    total: int,
    *,
    task_terms: tuple[str, ...],
    always: bool,
    kd: bool,
    blocks: bool,
) -> None:
    """UserError naming the first epoch range whose loss has no term with a non-zero weight.

    epochs / total: the run's epoch plan and ``train.epochs``; task_terms: the task terms the
    strategy computes (their weights come from each epoch's ``loss_weights``); always: a term
    whose weight never changes is non-zero (dual_supervision's ``soft``); kd: the enabled
    distillation blocks and teachers have a non-zero weight (each epoch's switch and
    ``lambda_coef`` decide); blocks: some distillation block is enabled.
    """
    if always:
        return

    def silent(epoch: int) -> bool:
        at = epochs.at(epoch)
        live = any(at.loss_weights.get(k, 0.0) > 0 for k in task_terms)
        return not live and not (kd and at.distillation and at.lambda_coef > 0)

    def cover(epoch: int) -> list[int]:
        return [i for i, st in enumerate(epochs.stages) if st.start <= epoch < st.end]

    first = next((e for e in range(total) if silent(e)), None)
    if first is None:
        return
    end = first + 1
    while end < total and silent(end) and cover(end) == cover(first):
        end += 1
    names = [f"stage_schedule[{i}] '{epochs.stages[i].name}'" for i in cover(first)]
    kd_text = "distillation is off or its lambda_coef is 0" if kd else "distillation is off"
    raise UserError(
        f"{', '.join(names) or 'train.loss_weights (no stage)'}, epochs {first}-{end}: no loss "
        f"term has a non-zero weight (train.loss_weights {', '.join(task_terms)} are 0 there and "
        f"{kd_text}{'' if blocks else ', no distillation block is enabled'}); nothing would "
        "train -- give a term a weight or enable a distillation block"
    )
