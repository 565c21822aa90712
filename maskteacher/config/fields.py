"""The field helper every config section uses, and the metadata readers.

Every field carries its help text, allowed values and range in ``dataclasses.field`` metadata;
the loader, the ``--set`` overrides and the generated config reference all read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    key: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    unused: bool = False,
) -> Any:
    """A dataclass field with the metadata the loader and the docs use.

    key: the name in the file when it differs from the attribute (``lambda`` is a keyword).
    ge / le / gt: numeric bounds. unused: accepted for compatibility with the origin project's
    configs but not implemented; loading it with a non-default value logs one warning.
    """
    meta = {"help": help, "key": key, "ge": ge, "le": le, "gt": gt, "unused": unused}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def file_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]
