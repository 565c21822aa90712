"""Supervision strategies, auxiliary losses and batch hooks: the trainer's extension registries.

A strategy is a class registered under a name with :func:`register_supervision`, built by its
``from_config(cfg, *, criterion, match)`` and called as ``(preds, batch, ctx) ->
SupervisionOutput``. The trainer picks one by name (:func:`strategy_name`):

- ``single``: ``dataset.mode: single`` -- each prompt was drawn from a known object, no matching;
- ``gt``: everything mode -- Hungarian matching of all predictions against the ground truth;
- ``replace_gt`` / ``dual_supervision`` (``mask_teacher.method``): registered by the
  mask-teacher module (issue 7), which reuses :func:`image_predictions`, :func:`match_and_pair`
  and :class:`~maskteacher.train.criterion.MaskCriterion`.

Auxiliary losses (feature distillation) register a builder ``(cfg) -> AuxLoss | None`` with
:func:`register_aux_loss`; batch hooks (an online teacher filling ``Batch.teacher``) register a
builder ``(cfg, device) -> BatchHook | None`` with :func:`register_batch_hook`.

Registration happens on import: every module of :data:`EXTENSION_MODULES` that exists is
imported before the registries are read, so adding ``maskteacher/train/mask_teacher.py`` or
``maskteacher/train/feature_kd.py`` needs no edit here.

Strategies, auxiliary losses and hooks declare the teacher fields they need
(``teacher_fields``; hooks: ``provides``) so the dataset loads only those from the cache; each
returns its terms with their weights and the trainer adds all weighted terms in one place
(:func:`~maskteacher.train.criterion.weighted_total`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from maskteacher.errors import UserError
from maskteacher.train.batch import Batch
from maskteacher.train.criterion import MaskCriterion, PairBatch
from maskteacher.train.forward import Predictions
from maskteacher.train.matcher import Match, MatchSettings, lowres_pixels, match_batch, unmatched
from maskteacher.train.schedule import EpochSettings

#: Modules imported (when present) before the registries are read; importing registers.
EXTENSION_MODULES: tuple[str, ...] = (
    "maskteacher.train.supervision",
    "maskteacher.train.mask_teacher",
    "maskteacher.train.feature_kd",
)


@dataclass
class StepContext:
    """Per-step information a strategy may use.

    settings: the epoch's resolved settings (loss weights, distillation switch, lambda_coef);
    generator: CPU generator seeded per step (loss-point sampling); reduce_count: turns a local
    count into the mean count per rank (sum all-reduced / world size; identity without DDP);
    image_size: S; epoch / step: position in training.
    """

    settings: EpochSettings
    generator: torch.Generator
    reduce_count: Callable[[float], float]
    image_size: int
    epoch: int = 0
    step: int = 0


@dataclass
class SupervisionOutput:
    """Named terms, the weights that apply to them, and plain-number stats for logging.

    stats keys used by the trainer: ``matched`` (pairs in this mini-batch), ``matched_iou_sum``
    (sum of the pairs' IoU), ``images``.
    """

    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    stats: dict[str, float] = field(default_factory=dict)
    matches: list[Match] | None = None


class SupervisionStrategy(Protocol):
    """A registered strategy class: built by ``from_config(cfg, *, criterion, match)`` (the one
    place it sees the Config), then called once per micro-batch."""

    teacher_fields: frozenset[str]

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput: ...


# name -> strategy class (with a ``from_config`` classmethod).
_REGISTRY: dict[str, type] = {}


def register_supervision(name: str):
    """Class decorator: register a strategy class (with ``from_config``) under ``name``."""

    def decorate(cls):
        _REGISTRY[name] = cls
        return cls

    return decorate


def supervision_names() -> list[str]:
    _import_extension_modules()
    return sorted(_REGISTRY)


def get_supervision(name: str) -> type:
    _import_extension_modules()
    if name not in _REGISTRY:
        raise UserError(
            f"supervision {name!r} is not available in this build; available: "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def _import_extension_modules() -> None:
    for module in EXTENSION_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


class AuxLoss(Protocol):
    """An extra loss block (feature distillation) run after the supervision strategy.

    teacher_fields: teacher fields it needs in the batch; needs_tokens: whether the student must
    return decoder tokens. Returns terms with their weights (it reads ``ctx.settings`` for the
    distillation switch and ``lambda_coef``).
    """

    teacher_fields: frozenset[str]
    needs_tokens: bool

    def __call__(
        self, preds: Predictions, batch: Batch, ctx: StepContext, supervision: SupervisionOutput
    ) -> SupervisionOutput: ...


class BatchHook(Protocol):
    """Runs on every device batch before the step; ``provides``: teacher fields it fills."""

    provides: frozenset[str]

    def __call__(self, batch: Batch) -> Batch: ...


_AUX_BUILDERS: list[Callable[..., AuxLoss | None]] = []
_HOOK_BUILDERS: list[Callable[..., BatchHook | None]] = []


def register_aux_loss(builder: Callable[..., AuxLoss | None]):
    """Decorator: register ``builder(cfg) -> AuxLoss | None`` (None: not enabled)."""
    if builder not in _AUX_BUILDERS:
        _AUX_BUILDERS.append(builder)
    return builder


def register_batch_hook(builder: Callable[..., BatchHook | None]):
    """Decorator: register ``builder(cfg, device) -> BatchHook | None`` (None: not enabled)."""
    if builder not in _HOOK_BUILDERS:
        _HOOK_BUILDERS.append(builder)
    return builder


def aux_loss_builders() -> list[Callable[..., AuxLoss | None]]:
    _import_extension_modules()
    return list(_AUX_BUILDERS)


def batch_hook_builders() -> list[Callable[..., BatchHook | None]]:
    _import_extension_modules()
    return list(_HOOK_BUILDERS)


# ----------------------------------------------------------------------------- shared helpers


@dataclass
class ImagePredictions:
    """One image's predictions with the K masks per prompt flattened (Q = P_i * K).

    logits: (Q, L, L); iou_pred: (Q,); prompt: (Q,) index of the prompt within the batch;
    points: (Q, 2) the prompt's first point (input frame); tokens: (Q, C) or None.
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    prompt: torch.Tensor
    points: torch.Tensor
    tokens: torch.Tensor | None


def image_predictions(preds: Predictions, batch: Batch) -> list[ImagePredictions]:
    """Split a batch's predictions by image, flattening the K masks of each prompt."""
    k = preds.masks_per_prompt
    out = []
    offsets = batch.prompt_offsets.tolist()
    for i in range(batch.num_images):
        lo, hi = offsets[i], offsets[i + 1]
        logits = preds.logits[lo:hi].flatten(0, 1)
        prompt = torch.arange(lo, hi, device=batch.points.device).repeat_interleave(k)
        tokens = None if preds.tokens is None else preds.tokens[lo:hi].flatten(0, 1)
        out.append(
            ImagePredictions(
                logits=logits,
                iou_pred=preds.iou_pred[lo:hi].flatten(),
                prompt=prompt,
                points=batch.points[prompt, 0, :],
                tokens=tokens,
            )
        )
    return out


def gather_pairs(
    images: list[ImagePredictions], targets: list[torch.Tensor], matches: list[Match]
) -> PairBatch:
    """Concatenate the matched (prediction, target) pairs and the unmatched predictions' IoU."""
    logits, iou_pred, tgts, free = [], [], [], []
    for img, tgt, match in zip(images, targets, matches):
        device = img.logits.device
        pred_idx = match.pred.to(device)
        logits.append(img.logits.index_select(0, pred_idx))
        iou_pred.append(img.iou_pred.index_select(0, pred_idx))
        tgts.append(tgt.index_select(0, match.target.to(tgt.device)))
        free.append(img.iou_pred.index_select(0, unmatched(img.logits.shape[0], match).to(device)))
    return PairBatch(
        logits=torch.cat(logits),
        iou_pred=torch.cat(iou_pred),
        targets=torch.cat(tgts),
        unmatched_iou_pred=torch.cat(free),
    )


def match_and_pair(
    images: list[ImagePredictions],
    targets: list[torch.Tensor],
    *,
    settings: MatchSettings,
    image_size: int,
    generator: torch.Generator | None = None,
) -> tuple[list[Match], PairBatch]:
    """Hungarian-match each image's predictions to ``targets[i]`` ((M_i, L, L)) and pair them."""
    pixels = None
    if settings.requires_point:
        pixels = [
            lowres_pixels(img.points, image_size=image_size, low_res_size=img.logits.shape[-1])
            for img in images
        ]
    matches = match_batch(
        [img.logits.detach() for img in images],
        targets,
        settings=settings,
        prompt_pixels=pixels,
        generator=generator,
    )
    return matches, gather_pairs(images, targets, matches)


def task_terms(
    criterion: MaskCriterion, pairs: PairBatch, ctx: StepContext
) -> dict[str, torch.Tensor]:
    """The criterion's terms on ``pairs``, normalised by the matched and unmatched counts
    averaged over DDP ranks (``ctx.reduce_count``) -- the one call every everything-mode
    strategy makes for its task losses."""
    return criterion(
        pairs,
        pair_normalizer=ctx.reduce_count(pairs.num_pairs),
        unmatched_normalizer=ctx.reduce_count(pairs.unmatched_iou_pred.shape[0]),
        generator=ctx.generator,
    )


def pair_stats(matches: list[Match], num_images: int) -> dict[str, float]:
    return {
        "matched": float(sum(len(m) for m in matches)),
        "matched_iou_sum": float(sum(float(m.iou.sum()) for m in matches)),
        "images": float(num_images),
    }


# ----------------------------------------------------------------------------- strategies


@register_supervision("gt")
class GTSupervision:
    """Everything mode: all predictions matched (Hungarian) against the ground-truth masks."""

    teacher_fields: frozenset[str] = frozenset()

    def __init__(self, *, criterion: MaskCriterion, match: MatchSettings) -> None:
        self.criterion = criterion
        self.match = match

    @classmethod
    def from_config(cls, cfg, *, criterion: MaskCriterion, match: MatchSettings) -> GTSupervision:
        return cls(criterion=criterion, match=match)

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        images = image_predictions(preds, batch)
        matches, pairs = match_and_pair(
            images,
            batch.gt_masks,
            settings=self.match,
            image_size=ctx.image_size,
            generator=ctx.generator,
        )
        terms = task_terms(self.criterion, pairs, ctx)
        return SupervisionOutput(
            terms=terms,
            weights=dict(ctx.settings.loss_weights),
            stats=pair_stats(matches, batch.num_images),
            matches=matches,
        )


@register_supervision("single")
class SingleSupervision:
    """Single mode: each prompt's target is the object it was drawn from.

    With multimask output the candidate with the highest IoU against the target is trained (the
    others get no loss), as in SAM's own training. ``cls`` has nothing to act on (every prediction
    has a target) and is 0.
    """

    teacher_fields: frozenset[str] = frozenset()

    def __init__(self, *, criterion: MaskCriterion) -> None:
        self.criterion = criterion

    @classmethod
    def from_config(
        cls, cfg, *, criterion: MaskCriterion, match: MatchSettings
    ) -> SingleSupervision:
        return cls(criterion=criterion)

    def __call__(self, preds: Predictions, batch: Batch, ctx: StepContext) -> SupervisionOutput:
        n, k = preds.iou_pred.shape
        targets = torch.stack(
            [batch.gt_masks[int(i)][int(t)] for i, t in zip(batch.prompt_image, batch.prompt_target)]
        ) if n else preds.logits.new_zeros((0, *preds.logits.shape[-2:]), dtype=torch.bool)  # fmt: skip
        with torch.no_grad():
            flat_p = (preds.logits.detach() > 0).flatten(2)  # (P, K, LL)
            flat_t = targets.flatten(1)[:, None, :]
            inter = (flat_p & flat_t).sum(-1).float()
            union = (flat_p | flat_t).sum(-1).float().clamp(min=1)
            best = (inter / union).argmax(dim=1)  # (P,)
        rows = torch.arange(n, device=preds.logits.device)
        pairs = PairBatch(
            logits=preds.logits[rows, best],
            iou_pred=preds.iou_pred[rows, best],
            targets=targets,
            unmatched_iou_pred=preds.iou_pred.new_zeros(0),
        )
        terms = self.criterion(
            pairs,
            pair_normalizer=ctx.reduce_count(n),
            unmatched_normalizer=1.0,
            generator=ctx.generator,
        )
        iou = (inter / union).max(dim=1).values if n else torch.zeros(0)
        stats = {
            "matched": float(n),
            "matched_iou_sum": float(iou.sum()),
            "images": float(batch.num_images),
        }
        return SupervisionOutput(terms=terms, weights=dict(ctx.settings.loss_weights), stats=stats)


def strategy_name(*, mode: str, mask_teacher_enabled: bool, method: str) -> str:
    """The registered strategy for a dataset mode and the mask-teacher switch."""
    if mode == "single":
        if mask_teacher_enabled:
            raise UserError(
                'mask_teacher.enable: true needs dataset.mode: "everything" (Hungarian matching '
                'requires multi-mask targets); got dataset.mode: "single"'
            )
        return "single"
    return method if mask_teacher_enabled else "gt"
