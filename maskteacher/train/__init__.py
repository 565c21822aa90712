"""Segment-everything (and single-prompt) fine-tuning of SAM-family students.

Entry point: :func:`train` (``maskteacher train CONFIG``). The parts, each usable alone:
:mod:`.matcher` (Hungarian matching), :mod:`.losses` / :mod:`.criterion` (named loss terms),
:mod:`.prompts` (prompt sampling), :mod:`.data` / :mod:`.cache_targets` (datasets),
:mod:`.forward` (batched student decoding), :mod:`.supervision` (strategy registry),
:mod:`.engine` (step and epoch loop), :mod:`.checkpoint`, :mod:`.schedule`, :mod:`.validate`.
"""

from maskteacher.train.batch import Batch, PromptSet, TeacherTargets, TrainSample, collate
from maskteacher.train.criterion import MaskCriterion, PairBatch, weighted_total
from maskteacher.train.matcher import Match, MatchSettings, match_batch, match_masks
from maskteacher.train.run import TrainResult, train
from maskteacher.train.supervision import (
    EXTENSION_MODULES,
    StepContext,
    SupervisionOutput,
    register_aux_loss,
    register_batch_hook,
    register_supervision,
)

__all__ = [
    "EXTENSION_MODULES",
    "Batch",
    "MaskCriterion",
    "Match",
    "MatchSettings",
    "PairBatch",
    "PromptSet",
    "StepContext",
    "SupervisionOutput",
    "TeacherTargets",
    "TrainResult",
    "TrainSample",
    "collate",
    "match_batch",
    "match_masks",
    "register_aux_loss",
    "register_batch_hook",
    "register_supervision",
    "train",
    "weighted_total",
]
