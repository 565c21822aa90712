"""Typed configuration: dataclass sections loaded from YAML or JSON, validated at load time.

The layout follows the origin project's JSON configs (``dataset``, ``model``, ``train``,
``freeze``, ``distillation``, ``teachers``, ``mask_teacher``, ``visual``, ``stage_schedule``) so
that users' existing files keep working, plus our own ``precompute`` and ``cache`` sections.

Every field carries its help text, allowed values and range in ``dataclasses.field`` metadata;
the loader, the ``--set`` overrides and the generated config reference (docs) all read the same
metadata, so they cannot drift apart.

Only wiring code (CLI, builders) sees a :class:`Config`; leaf functions take plain arguments.

Modules: :mod:`.fields` (the field helper), :mod:`.sections` and :mod:`.teachers` (the
sections), :mod:`.root` (:class:`Config`), :mod:`.loading` (files, overrides, validation),
:mod:`.reference` (the generated reference).
"""

from maskteacher.config.loading import apply_override, config_from_dict, load_config
from maskteacher.config.reference import (
    REFERENCE_BEGIN,
    REFERENCE_END,
    iter_reference,
    reference_markdown,
)
from maskteacher.config.root import Config
from maskteacher.config.sections import (
    CacheConfig,
    DatasetConfig,
    FreezeConfig,
    LossWeights,
    ModelConfig,
    PrecomputeConfig,
    StageConfig,
    StoreConfig,
    TrainConfig,
    VisualConfig,
)
from maskteacher.config.teachers import (
    AttentionMatching,
    DecoderMaskToken,
    DecoderMatching,
    DenseMaskLogits,
    DistillationConfig,
    DynamicLambda,
    EncoderMatching,
    EncoderPatch,
    MaskTeacherConfig,
    PromptEmbed,
    RelationalKD,
    SoftLoss,
    TeacherEntry,
    check_model_type,
    resolve_teacher_type,
    teacher_weights,
)

__all__ = [
    "REFERENCE_BEGIN",
    "REFERENCE_END",
    "AttentionMatching",
    "CacheConfig",
    "Config",
    "DatasetConfig",
    "DecoderMaskToken",
    "DecoderMatching",
    "DenseMaskLogits",
    "DistillationConfig",
    "DynamicLambda",
    "EncoderMatching",
    "EncoderPatch",
    "FreezeConfig",
    "LossWeights",
    "MaskTeacherConfig",
    "ModelConfig",
    "PrecomputeConfig",
    "PromptEmbed",
    "RelationalKD",
    "SoftLoss",
    "StageConfig",
    "StoreConfig",
    "TeacherEntry",
    "TrainConfig",
    "VisualConfig",
    "apply_override",
    "check_model_type",
    "config_from_dict",
    "iter_reference",
    "load_config",
    "reference_markdown",
    "resolve_teacher_type",
    "teacher_weights",
]
