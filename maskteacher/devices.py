"""Device selection shared by every command (``train.device``, ``precompute.device``, eval)."""

from __future__ import annotations

import torch

from maskteacher.errors import UserError


def resolve_device(spec: str, *, local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Under torchrun ``auto`` and ``cuda`` mean ``cuda:<local_rank>``. ``key`` names the config
    key in error messages. UserError for an unknown spec, CUDA without a GPU, or an index past
    the visible devices.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"{key}: got {spec!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UserError(f"{key}: got {spec!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"{key} is {spec!r} but no CUDA device is available on this machine")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(
            f"{key}: cuda:{index} requested but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    return torch.device("cuda", index)
