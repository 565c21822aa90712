"""Training checkpoints: contents, ``weights_only`` loading, RNG state capture.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects),
so ``torch.load(path, weights_only=True)`` reads it:

- ``format``: :data:`CHECKPOINT_FORMAT`, ``version``: :data:`CHECKPOINT_VERSION`;
- ``model``: the student's state dict; ``model_type`` / ``image_size``: what it was built as;
- ``optimizer``, ``scheduler``, ``scaler``: their state dicts;
- ``progress``: :class:`Progress` as a dict (epoch, batches done in it, optimizer steps, ...);
- ``rng``: python / numpy / torch (+ cuda) generator states as tensors and numbers;
- ``config``: the resolved config as a JSON string; ``cache_id``: the teacher cache manifest's id
  or None.

The trainer writes them with :func:`maskteacher.models.checkpoint.atomic_save` (the same write
as the official export): a temporary file in the same folder, fsynced, then renamed over the
target (``os.replace``), so a crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskteacher.errors import UserError

CHECKPOINT_FORMAT = "maskteacher.train"
CHECKPOINT_VERSION = 1
#: What :func:`build_checkpoint` writes and a resume reads.
REQUIRED_KEYS = frozenset(
    {"format", "version", "model", "model_type", "image_size", "optimizer", "scheduler",
     "scaler", "progress", "rng", "config", "cache_id"}
)  # fmt: skip


@dataclass
class Progress:
    """Where training stands.

    epoch: the epoch in progress (or the next to run when ``batches_done == 0``); batches_done:
    micro-batches of ``epoch`` already trained (per rank); step: optimizer steps so far;
    micro_step: micro-batches so far; best_metric: best validation score (None before the first
    validation); best_epoch; bad_validations: validations since the best (early stopping);
    lambda_scale / lambda_wait: ``distillation.dynamic_lambda``'s scale on ``lambda_coef`` and
    its count of validations without improvement (a checkpoint without them resumes at 1 / 0).
    """

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    micro_step: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    bad_validations: int = 0
    lambda_scale: float = 1.0
    lambda_wait: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Python, numpy (global) and torch (CPU + every CUDA device) RNG states, weights_only-safe."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------- write


def build_checkpoint(
    *,
    model_state: dict[str, torch.Tensor],
    model_type: str,
    image_size: int,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any],
    progress: Progress,
    config_json: str,
    cache_id: str | None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (see the module docstring); tensors are moved to the CPU."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "model_type": model_type,
        "image_size": int(image_size),
        "optimizer": _to_cpu(optimizer),
        "scheduler": scheduler,
        "scaler": scaler,
        "progress": progress.to_dict(),
        "rng": capture_rng() if rng is None else rng,
        "config": config_json,
        "cache_id": cache_id,
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------- read


def load_training_checkpoint(
    path: str | os.PathLike[str], *, model_type: str, image_size: int
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`build_checkpoint` + :func:`~maskteacher.models.checkpoint.atomic_save` (weights only).

    Raises UserError (one line) for a missing or unreadable file, a file that is not a training
    checkpoint, or one for a different backbone or image size.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint to resume from not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable training checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: not a maskteacher training checkpoint (expected format {CHECKPOINT_FORMAT!r}; "
            "to start from plain weights use model.checkpoint_path)"
        )
    missing = sorted(REQUIRED_KEYS - set(ckpt))
    if missing:
        raise UserError(
            f"{path}: the training checkpoint lacks {', '.join(missing)} (a partial or edited "
            "file); resume from last.pt or best.pt as a run wrote it"
        )
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{path}: checkpoint version {ckpt.get('version')!r}; this build reads version {CHECKPOINT_VERSION}"
        )
    if ckpt["model_type"] != model_type or ckpt["image_size"] != image_size:
        raise UserError(
            f"{path}: checkpoint is for model.type {ckpt['model_type']!r} at image_size "
            f"{ckpt['image_size']}; the config asks for {model_type!r} at {image_size}"
        )
    return ckpt
