"""``build_sam``: the one entry point that turns a registry name (+ checkpoint) into a model."""

from __future__ import annotations

import os

from maskteacher.errors import UserError
from maskteacher.models.checkpoint import load_checkpoint
from maskteacher.models.registry import MODEL_BUILDERS, MODEL_TYPES, PATCH_SIZE, RegistrySam


def build_sam(
    model_type: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 1024,
    strict: bool = True,
    config_keys: tuple[str, str] = ("model.type", "model.strict"),
) -> RegistrySam:
    """Build registry model ``model_type`` for ``image_size`` inputs, load ``checkpoint`` if given.

    Weights are loaded (see :func:`~maskteacher.models.load_checkpoint`; ``strict`` as there)
    before the model is switched to eval mode; the model is returned in eval mode on the CPU in
    float32 -- callers that train it call ``.train()`` (and ``set_batchnorm_eval``).
    Raises UserError for an unknown type, a bad image_size or a checkpoint that does not fit;
    ``config_keys`` (model type, strict) are the config keys those messages name.
    """
    builder = MODEL_BUILDERS.get(model_type)
    if builder is None:
        raise UserError(
            f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size % PATCH_SIZE:
        raise UserError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    model = builder(image_size)
    if checkpoint is not None:
        load_checkpoint(
            model, checkpoint, strict=strict, model_type=model_type, config_keys=config_keys
        )
    return model.eval()
