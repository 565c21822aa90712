"""Checkpoint reading, loading and official export (backbone detection: :mod:`.backbone`).

One loading path for every caller (student, teacher, resume): :func:`load_checkpoint`.

- Files are read with ``torch.load(weights_only=True)`` only: a downloaded checkpoint can never
  run pickled code. Flat state dicts, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and
  ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) key prefixes are accepted.
- ``strict=True`` (default) refuses any missing, unexpected or shape-mismatched key with one line
  naming them; ``strict=False`` loads what matches and reports the rest in a :class:`LoadReport`.
- A checkpoint whose image encoder has another structure than the model's fails in both modes
  with one line naming what it looks like, e.g. ``checkpoint has 32 encoder blocks of width 1280
  (vit_h); model.type is vit_b``.
- ViT position tables that depend on the input size (``pos_embed`` and the global-attention
  ``rel_pos_h/w``) are resized when a checkpoint made for another ``image_size`` is loaded
  (bicubic / linear, as segment-anything itself does for rel_pos) and listed in
  ``LoadReport.resized``. TinyViT weights do not depend on the input size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maskteacher.errors import UserError
from maskteacher.models.backbone import ENCODER_PREFIX as _ENC
from maskteacher.models.backbone import detect_backbone, encoder_signature

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_LIST_SHOWN = 4  # how many key groups a one-line message names before "+N more"


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (tensors on CPU).

    Always ``torch.load(weights_only=True)``. Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``
    (nested too) and strips ``module.`` / ``_orig_mod.`` key prefixes.
    Raises UserError (one line) for a missing file, a file torch cannot read, a file holding
    pickled Python objects, or content that is not a mapping of names to tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint path is not a file: {path}")
    obj = _torch_load(path)
    while isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_mapping(obj):
        raise UserError(
            f"checkpoint {path} is not a state dict: expected a non-empty mapping of names to "
            f"tensors (flat, or under 'model' / 'state_dict'), found {_describe_content(obj)}"
        )
    return {_strip_prefixes(str(k)): v for k, v in obj.items()}


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # garbage bytes surface as KeyError, EOFError, RuntimeError, ...
        if not (isinstance(exc, RuntimeError) and "mmap" in str(exc)):
            raise _unreadable(path, exc) from exc
    # Legacy (non-zip) torch files cannot be memory-mapped: read them into memory instead.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> UserError:
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return UserError(
            f"checkpoint {path} contains pickled Python objects ({found.group(1)}); only tensors "
            "and plain containers are loaded (torch.load weights_only=True) -- re-save it as a "
            "state_dict"
        )
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        reason = "bytes are not a pickle of tensors"
    else:
        reason = text.strip().splitlines()[0][:120] if text.strip() else type(exc).__name__
    return UserError(f"checkpoint {path} is not a readable PyTorch checkpoint ({reason})")


def _is_tensor_mapping(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe_content(obj: object) -> str:
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty mapping"
        return "keys " + ", ".join(repr(k) for k in list(obj)[:_LIST_SHOWN])
    return type(obj).__name__


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did. Shapes are tuples; keys are model state-dict names."""

    source: str
    model_type: str | None
    checkpoint_type: str | None  # detected registry name of the checkpoint, if any
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every model tensor was loaded and nothing in the checkpoint was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """One line listing missing / unexpected / shape-mismatched keys ('' when exact)."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({summarise_keys(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({summarise_keys(self.unexpected)})")
        if self.mismatched:
            shown = ", ".join(
                f"{k} {list(c)} vs model {list(m)}" for k, c, m in self.mismatched[:_LIST_SHOWN]
            )
            more = len(self.mismatched) - _LIST_SHOWN
            tail = f", +{more} more" if more > 0 else ""
            parts.append(f"{len(self.mismatched)} with another shape ({shown}{tail})")
        return "; ".join(parts)

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        line = f"loaded {len(self.loaded)}/{total} tensors from {self.source}"
        if self.resized:
            line += (
                f"; resized {len(self.resized)} ({summarise_keys(k for k, _, _ in self.resized)})"
            )
        problems = self.problems()
        return f"{line}; not loaded: {problems}" if problems else line


def summarise_keys(keys: Iterable[str]) -> str:
    """One line naming keys grouped by their first two name parts.

    A group of one shows the key itself, a larger group its prefix and size:
    ``mask_decoder.hf_token.weight, mask_decoder.hf_mlp.* (6)``.
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(".".join(key.split(".")[:2]), []).append(key)
    items = [
        members[0] if len(members) == 1 else f"{group}.* ({len(members)})"
        for group, members in groups.items()
    ]
    more = len(items) - _LIST_SHOWN
    return ", ".join(items[:_LIST_SHOWN]) + (f", +{more} more groups" if more > 0 else "")


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    model_type: str | None = None,
    config_keys: tuple[str, str] = ("model.type", "model.strict"),
) -> LoadReport:
    """Load a checkpoint file into ``model`` (a SAM); the one loading path of the package.

    ``model_type`` names the model in messages (default: ``model.model_type`` or the detected
    registry entry). Raises UserError (one line) when the file is unreadable, when the
    checkpoint's encoder is another backbone, or, with ``strict``, when any key is missing,
    unexpected or of another shape. With ``strict=False`` only matching tensors are copied and
    the rest is reported (and logged as a warning). Works in any train/eval state.
    ``config_keys``: the config keys of the model type and of strict loading, named in messages
    (a teacher's are ``mask_teacher.teacher_type`` / ``mask_teacher.strict``).
    """
    state = read_state_dict(path)
    return load_state_dict_checked(
        model,
        state,
        source=str(path),
        strict=strict,
        model_type=model_type,
        config_keys=config_keys,
    )


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    strict: bool = True,
    model_type: str | None = None,
    config_keys: tuple[str, str] = ("model.type", "model.strict"),
) -> LoadReport:
    """:func:`load_checkpoint` for a state dict already in memory (``source`` names it)."""
    type_key, strict_key = config_keys
    own = model.state_dict()
    model_type = model_type or getattr(model, "model_type", None) or detect_backbone(own)
    ckpt_sig, model_sig = encoder_signature(state), encoder_signature(own)
    ckpt_type = detect_backbone(state) if ckpt_sig is not None else None
    if ckpt_sig is not None and model_sig is not None and ckpt_sig != model_sig:
        raise UserError(
            f"checkpoint {source} has {ckpt_sig.describe()} ({ckpt_type or 'unknown backbone'}); "
            f"{type_key} is {model_type or 'unknown'} ({model_sig.describe()})"
        )
    state, resized = _resize_position_tables(state, own)
    report = LoadReport(
        source=source, model_type=model_type, checkpoint_type=ckpt_type, resized=resized
    )
    to_load: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = state.get(key)
        if value is None:
            report.missing.append(key)
        elif value.shape != target.shape:
            report.mismatched.append((key, tuple(value.shape), tuple(target.shape)))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    if strict and not report.exact:
        raise UserError(
            f"checkpoint {source} does not match model {model_type or '(unknown type)'}: "
            f"{report.problems()} "
            f"(strict loading; set {strict_key}: false to load only the matching tensors)"
        )
    if not to_load and own:
        raise UserError(
            f"checkpoint {source} matches none of the {len(own)} tensors of model "
            f"{model_type or '(unknown type)'} ({report.problems()}); {strict_key}: false loads "
            f"only matching tensors, and there are none -- is it a checkpoint for {type_key}?"
        )
    model.load_state_dict(to_load, strict=False)
    if report.exact:
        log.info(report.summary())
    else:
        log.warning(report.summary())
    return report


_POS_EMBED = _ENC + "pos_embed"
_REL_POS = re.compile(re.escape(_ENC) + r"blocks\.\d+\.attn\.rel_pos_[hw]$")


def _resize_position_tables(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Resize ViT pos_embed (1, g, g, C) and global rel_pos (2g-1, d) to the model's image size."""
    out = dict(state)
    resized = []
    for key, value in state.items():
        target = own.get(key)
        if target is None or value.shape == target.shape or value.ndim != target.ndim:
            continue
        if key == _POS_EMBED and value.ndim == 4 and value.shape[3] == target.shape[3]:
            grid = (int(target.shape[1]), int(target.shape[2]))
            maps = value.float().permute(0, 3, 1, 2)
            new = F.interpolate(maps, size=grid, mode="bicubic", align_corners=False)
            out[key] = new.permute(0, 2, 3, 1).to(value.dtype)
        elif _REL_POS.match(key) and value.ndim == 2 and value.shape[1] == target.shape[1]:
            rows = value.float().t().unsqueeze(0)  # (1, d, L)
            new = F.interpolate(rows, size=int(target.shape[0]), mode="linear", align_corners=False)
            out[key] = new.squeeze(0).t().to(value.dtype)
        else:
            continue
        resized.append((key, tuple(value.shape), tuple(target.shape)))
    return out, resized


# ----------------------------------------------------------------------------- export


def export_official(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights as a plain flat state dict (CPU tensors), atomically.

    The file loads with segment-anything's ``sam_model_registry[...]`` (vit_h/l/b) and MobileSAM's
    (vit_t) builders, which build 1024-input models: a ViT model built at another image_size has
    other ``pos_embed`` / ``rel_pos`` shapes (a warning is logged; :func:`load_checkpoint`
    resizes them, the official builders do not). DDP ``module.`` / ``_orig_mod.`` prefixes are
    removed. Written to a temporary name in the same folder, fsynced, then renamed over ``path``.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        _strip_prefixes(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }
    pos_embed = state.get(_POS_EMBED)
    if pos_embed is not None and pos_embed.shape[1] != 1024 // 16:
        log.warning(
            "exporting a ViT model built for image_size %d to %s: the official builders expect "
            "1024 and will reject its pos_embed %s",
            pos_embed.shape[1] * 16,
            path,
            list(pos_embed.shape),
        )
    atomic_save(state, path)


def atomic_save(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
