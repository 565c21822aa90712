"""The teacher of a precompute run: what it is, how it is identified, how it generates.

:class:`TeacherSpec` names the model (registry type, checkpoint, strict loading, image size);
:func:`build_teacher` builds it in eval mode on a device. Its identity in the cache header
(``checkpoint_sha256``) is the sha256 of the checkpoint file -- what the trainer recomputes
from ``mask_teacher.checkpoint_path``. A teacher without a checkpoint (random weights, for tests
and benchmarks only) is built from torch seed :data:`RANDOM_TEACHER_SEED` so that every worker
and every resumed run gets the same weights, and is identified as ``"weights:" + sha256`` of its
state dict (names, dtypes, shapes and bytes in name order), which can never equal a file hash.

A SAM type (``vit_h`` as in the users' spec) with a SAM-HQ checkpoint is built as its SAM-HQ
variant (``vit_h_hq``, :mod:`maskteacher.models.hq`) and the cache header records that type, so a
SAM-HQ cache is never taken for a SAM one: :meth:`TeacherSpec.built_type`.

The generation settings (:class:`maskteacher.models.everything.GenerationParams`, beside the
generator they parameterise) are recorded in the cache header by
:meth:`~maskteacher.models.everything.GenerationParams.header_params`: the part that changes the
cache content. ``points_per_batch`` only changes how the work is chunked and is left out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from maskteacher.models import build_sam, built_teacher_type, sha256_file
from maskteacher.models.prompt_decoder import decoder_state

log = logging.getLogger(__name__)

#: torch seed used to build a teacher that has no checkpoint.
RANDOM_TEACHER_SEED = 0


@dataclass(frozen=True)
class TeacherSpec:
    """model_type: registry name; checkpoint: weights file or None (random weights, seeded)."""

    model_type: str
    checkpoint: str | None
    image_size: int
    strict: bool = True
    #: config keys of the teacher's type and strict loading, named in error messages
    config_keys: tuple[str, str] = ("mask_teacher.teacher_type", "mask_teacher.strict")

    def built_type(self) -> str:
        """The registry type the teacher is built as (and the cache header's ``teacher_type``):
        ``model_type``, or its SAM-HQ variant for a SAM-HQ checkpoint (module docstring)."""
        return built_teacher_type(self.model_type, self.checkpoint)

    def identity(self, model: torch.nn.Module | None = None) -> str:
        """The cache header's ``checkpoint_sha256`` for this teacher (module docstring)."""
        if self.checkpoint is not None:
            return sha256_file(self.checkpoint)
        if model is None:
            model = build_teacher(self, torch.device("cpu"))
        return "weights:" + state_dict_sha256(model)


def build_teacher(spec: TeacherSpec, device: torch.device) -> torch.nn.Module:
    """Build the teacher in eval mode on ``device`` (UserError for a bad type or checkpoint)."""
    if spec.checkpoint is None:
        log.warning(
            "teacher %s has no checkpoint: random weights (seed %d) -- only useful for tests",
            spec.model_type,
            RANDOM_TEACHER_SEED,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model = build_sam(spec.model_type, None, image_size=spec.image_size)
    else:
        model = build_sam(
            spec.model_type,
            spec.checkpoint,
            image_size=spec.image_size,
            strict=spec.strict,
            config_keys=spec.config_keys,
            detect_hq=True,
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def decoder_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The teacher's prompt encoder + mask decoder tensors as numpy arrays (the cache's
    ``teacher_decoder.npz``), in their own dtypes (float32 weights, as loaded)."""
    return {k: v.detach().cpu().numpy() for k, v in decoder_state(model.state_dict()).items()}
