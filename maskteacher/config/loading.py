"""Loading a config: parse the file, apply ``--set`` overrides, build the typed sections with
one-line errors naming the key, the value and what is allowed, then the cross-field checks."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from maskteacher.config.fields import default_of, file_key
from maskteacher.config.root import Config, walk
from maskteacher.config.sections import LossWeights
from maskteacher.config.teachers import check_model_type
from maskteacher.config_files import read_config_file
from maskteacher.errors import UserError

log = logging.getLogger("maskteacher.config")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a config file.

    path: ``.yaml`` / ``.yml`` / ``.json`` (chosen by extension).
    overrides: ``section.key=value`` strings; values are parsed as YAML scalars.
    Raises UserError with one line naming the key, the value and what is allowed.
    """
    data = read_config_file(path)
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data, source=str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to raw config data in place (list items: ``teachers.0.weight``)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_item(node, part, dotted)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        index = int(last) if last.isdigit() else -1
        if not 0 <= index < len(node):
            raise UserError(
                f"--set {dotted}: list index {last} out of range (the list has {len(node)} items)"
            )
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {dotted}: '{'.'.join(parts[:-1])}' is not a section")


def _list_item(node: list, part: str, dotted: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(
            f"--set {dotted}: '{part}' is not an index of a list with {len(node)} items"
        )
    return node[int(part)]


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """Build and validate a Config from raw (file) data."""
    cfg = _build(Config, data, "")
    _validate_cross_fields(cfg)
    _check_model_types(cfg)
    _warn_unused(cfg)
    return cfg


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    where = path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {_show(data)}")
    fields = {file_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise UserError(_unknown_key_message(path, str(key), list(fields)))
    kwargs = {}
    for key, f in fields.items():
        if key not in data:
            continue
        key_path = f"{path}.{key}" if path else key
        value = _convert(hints[f.name], data[key], key_path)
        _check_range(f, value, key_path)
        kwargs[f.name] = value
    return cls(**kwargs)


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    section = f"'{path}'" if path else "the top level"
    return f"unknown config key '{full}'{hint} (valid keys in {section}: {', '.join(valid)})"


def _convert(tp: Any, value: Any, key_path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # `X | None`: X's own error is the precise one
            try:
                return _convert(members[0], value, key_path)
            except UserError as exc:
                own = str(exc).startswith(f"{key_path}: ") and type(None) in args
                raise UserError(f"{exc} (or null)" if own else str(exc)) from None
        # bool first so that `resume: true` stays a bool rather than the string "True"
        members.sort(key=lambda a: a is not bool)
        for member in members:
            try:
                return _convert(member, value, key_path)
            except UserError as exc:
                errors.append(exc)
        allowed = " or ".join(_describe(a) for a in args)
        raise UserError(f"{key_path}: got {_show(value)}; expected {allowed}")
    if origin is Literal:
        if value not in args:
            raise UserError(
                f"{key_path}: got {_show(value)}; allowed values: {', '.join(repr(a) for a in args)}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key_path}: expected a list, got {_show(value)}")
        return [_convert(args[0], item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key_path}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(args[1], v, f"{key_path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key_path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key_path}: got {_show(value)}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key_path}: got {_show(value)}; expected an integer")
    if tp is float:
        return _finite_float(value, key_path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key_path}: got {_show(value)}; expected a string")
    if tp is Any:
        return value
    raise TypeError(f"config field {key_path} has an unsupported type {tp!r}")  # programming error


def _finite_float(value: Any, key_path: str) -> float:
    """A finite float from a number (or a YAML 1.1 string such as ``1e-4``); inf / nan are
    config errors: they pass every range check and then train on garbage."""
    number = _as_float(value)
    if number is None:
        raise UserError(f"{key_path}: got {_show(value)}; expected a number")
    if not math.isfinite(number):
        raise UserError(f"{key_path}: got {_show(value)}; expected a finite number")
    return number


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            return math.inf
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_range(f: dataclasses.Field, value: Any, key_path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, le, gt = f.metadata.get("ge"), f.metadata.get("le"), f.metadata.get("gt")
    bounds = []
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    ok = (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
    if not ok:
        if ge is not None and le is not None:
            allowed = f"a value in [{ge:g}, {le:g}]"
        else:
            allowed = "a value " + " and ".join(bounds)
        raise UserError(f"{key_path}: got {value!r}; allowed: {allowed}")


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string (path)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


def _validate_cross_fields(cfg: Config) -> None:
    mt = cfg.mask_teacher
    if mt.enable and cfg.dataset.mode != "everything":
        raise UserError(
            'mask_teacher.enable: true needs dataset.mode: "everything" (Hungarian matching requires '
            f'multi-mask targets); got dataset.mode: "{cfg.dataset.mode}"'
        )
    if cfg.dataset.min_points > cfg.dataset.max_points:
        raise UserError(
            f"dataset.min_points ({cfg.dataset.min_points}) must not exceed dataset.max_points ({cfg.dataset.max_points})"
        )
    if cfg.model.image_size % 16:
        raise UserError(
            f"model.image_size: got {cfg.model.image_size}; allowed: a multiple of 16 (e.g. 1024, 256)"
        )
    valid_weights = [f.name for f in dataclasses.fields(LossWeights)]
    for i, stage in enumerate(cfg.stage_schedule):
        where = f"stage_schedule[{i}]"
        end = cfg.train.epochs if stage.end_epoch is None else stage.end_epoch
        if end <= stage.start_epoch:
            raise UserError(
                f"{where}: end_epoch ({end}) must be greater than start_epoch ({stage.start_epoch})"
            )
        for key, value in (stage.loss_weights or {}).items():
            if key not in valid_weights:
                raise UserError(_unknown_key_message(f"{where}.loss_weights", key, valid_weights))
            if value < 0:
                raise UserError(f"{where}.loss_weights.{key}: got {value!r}; allowed: a value >= 0")
    names = [t.name for t in cfg.teachers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"teachers: names must be unique; repeated: {', '.join(dupes)}")


def _check_model_types(cfg: Config) -> None:
    """The student, mask-teacher and feature-teacher types are registry names."""
    check_model_type(cfg.model.type, "model.type")
    check_model_type(cfg.mask_teacher.teacher_type, "mask_teacher.teacher_type")
    for i, entry in enumerate(cfg.teachers):
        if entry.type is not None:
            check_model_type(entry.type, f"teachers[{i}].type")


def _warn_unused(cfg: Config) -> None:
    """One warning listing origin keys that are accepted but not implemented, when set."""
    used = []
    for key_path, f, value in walk(cfg, ""):
        if f.metadata.get("unused") and value != default_of(f):
            used.append(key_path)
    if used:
        log.warning(
            "config keys accepted for compatibility with the origin project, not used: %s",
            ", ".join(used),
        )
