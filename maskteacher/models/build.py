"""``build_sam``: the one entry point that turns a registry name (+ checkpoint) into a model."""

from __future__ import annotations

import logging
import os

from torch import nn

from maskteacher.errors import UserError
from maskteacher.models.checkpoint import load_state_dict_checked, read_state_dict
from maskteacher.models.hq import hq_keys, hq_variant
from maskteacher.models.registry import MODEL_BUILDERS, MODEL_TYPES, PATCH_SIZE

log = logging.getLogger(__name__)

#: The config keys of the student model; any other keys name a teacher (see ``detect_hq``).
STUDENT_KEYS = ("model.type", "model.strict")


def build_sam(
    model_type: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 1024,
    strict: bool = True,
    config_keys: tuple[str, str] = STUDENT_KEYS,
    detect_hq: bool | None = None,
) -> nn.Module:
    """Build registry model ``model_type`` for ``image_size`` inputs, load ``checkpoint`` if given.

    Weights are loaded (see :func:`~maskteacher.models.load_checkpoint`; ``strict`` as there)
    before the model is switched to eval mode; the model is returned in eval mode on the CPU in
    float32 -- callers that train it call ``.train()`` (and ``set_batchnorm_eval``). The model is
    a :class:`~maskteacher.models.RegistrySam`, or for SAM-HQ types a
    :class:`~maskteacher.models.sam_hq.RegistrySamHQ`.

    detect_hq: with a checkpoint holding SAM-HQ's decoder (:mod:`maskteacher.models.hq`) and a
    SAM ``model_type``, build the type's SAM-HQ variant instead (one log line says so). None
    (default): detect for teachers -- callers whose ``config_keys`` are not the student's
    ``model.*`` -- and not for the student, whose strict loading then names the extra keys.
    Raises UserError for an unknown type, a bad image_size or a checkpoint that does not fit;
    ``config_keys`` (model type, strict) are the config keys those messages name.
    """
    if MODEL_BUILDERS.get(model_type) is None:
        raise UserError(
            f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size % PATCH_SIZE:
        raise UserError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    if checkpoint is None:
        return MODEL_BUILDERS[model_type](image_size).eval()
    state = read_state_dict(checkpoint)
    if detect_hq is None:
        detect_hq = tuple(config_keys) != STUDENT_KEYS
    built_type = (hq_variant(model_type, state) if detect_hq else None) or model_type
    if built_type != model_type:
        log.info(
            "SAM-HQ checkpoint detected: %s has SAM-HQ's mask-decoder parameters (%d tensors); "
            "%s %s is built as %s",
            checkpoint,
            len(hq_keys(state)),
            config_keys[0],
            model_type,
            built_type,
        )
    model = MODEL_BUILDERS[built_type](image_size)
    load_state_dict_checked(
        model,
        state,
        source=str(checkpoint),
        strict=strict,
        model_type=model_type if built_type == model_type else f"{model_type} (as {built_type})",
        config_keys=config_keys,
    )
    return model.eval()
