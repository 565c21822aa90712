"""Supervision: how a batch's predictions become loss terms.

- :mod:`.matcher` -- Hungarian matching (pure, no-grad, fp32);
- :mod:`.losses` / :mod:`.criterion` -- per-pair mask losses, the named task terms, weighting;
- :mod:`.pairs` -- split predictions by image, match, gather pairs, task terms;
- :mod:`.gt` -- ground-truth strategies (everything mode, single mode);
- :mod:`.teacher_match` / :mod:`.mask_teacher` -- ``replace_gt`` and ``dual_supervision``.

The strategies are plain data: :data:`SUPERVISIONS` maps a name to its class. Adding a method
is one class (keyword-only constructor, ``teacher_fields``, ``__call__(preds, batch, ctx)``)
and one entry here; :func:`build_strategy` passes each class the constructor arguments it
names out of those the builders offer.
"""

from __future__ import annotations

import inspect
from typing import Any

from maskteacher.errors import UserError
from maskteacher.train.supervision.base import (
    AuxLoss,
    StepContext,
    SupervisionOutput,
    SupervisionStrategy,
)
from maskteacher.train.supervision.gt import GTSupervision, SingleSupervision
from maskteacher.train.supervision.mask_teacher import DualSupervision, ReplaceGTSupervision

#: strategy name -> class (``single``: dataset.mode single; ``gt``: everything mode without the
#: mask teacher; the others: ``mask_teacher.method``).
SUPERVISIONS: dict[str, type] = {
    "gt": GTSupervision,
    "single": SingleSupervision,
    "replace_gt": ReplaceGTSupervision,
    "dual_supervision": DualSupervision,
}


def strategy_name(*, mode: str, mask_teacher_enabled: bool, method: str) -> str:
    """The :data:`SUPERVISIONS` key for a dataset mode and the mask-teacher switch."""
    if mode == "single":
        if mask_teacher_enabled:
            raise UserError(
                'mask_teacher.enable: true needs dataset.mode: "everything" (Hungarian matching '
                'requires multi-mask targets); got dataset.mode: "single"'
            )
        return "single"
    return method if mask_teacher_enabled else "gt"


def build_strategy(name: str, **offered: Any) -> SupervisionStrategy:
    """Construct strategy ``name`` with the keyword arguments of ``offered`` its constructor
    names (a required one that is not offered is a programming error)."""
    if name not in SUPERVISIONS:
        raise UserError(f"unknown supervision {name!r}; expected one of {sorted(SUPERVISIONS)}")
    cls = SUPERVISIONS[name]
    params = inspect.signature(cls).parameters
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty and p.name not in offered
    ]
    if missing:
        raise TypeError(f"{cls.__name__} needs {missing}, which the builders do not offer")
    return cls(**{k: v for k, v in offered.items() if k in params})


__all__ = [
    "SUPERVISIONS",
    "AuxLoss",
    "StepContext",
    "SupervisionOutput",
    "SupervisionStrategy",
    "build_strategy",
    "strategy_name",
]
