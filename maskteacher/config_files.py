"""Config files to raw data: the text (UTF-8, or one error line for a binary / non-UTF-8 file)
and its YAML or JSON parse, where a key repeated in one mapping is an error (PyYAML and the json
module silently keep the last one). :mod:`maskteacher.config` builds the typed config from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from maskteacher.errors import UserError

CONFIG_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    kind = CONFIG_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: config files must end in .yaml, .yml or .json (got '{path.suffix or 'no suffix'}')"
        )
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    data = parse_config_text(read_config_text(path), kind, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def read_config_text(path: Path) -> str:
    """The text of a config file; UserError when it is unreadable, binary or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "expected a YAML or JSON config"
        ) from None


class _DuplicateKey(Exception):
    def __init__(self, key: Any, where: str) -> None:
        super().__init__(f"duplicate key {key!r}{where}; each key may appear only once")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise _DuplicateKey(key, f" at line {line} (first at line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key, f" in the object with keys {', '.join(dict.fromkeys(keys))}")
    return dict(pairs)


def parse_config_text(text: str, kind: str, path: Path) -> Any:
    """Parse YAML or JSON config text; UserError (one line) on a syntax error or a repeated key."""
    try:
        if kind == "json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: not valid {kind.upper()}: {first}") from None
