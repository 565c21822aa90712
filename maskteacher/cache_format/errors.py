"""Errors raised by the cache format. This package imports nothing else from maskteacher."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CacheError(Exception):
    """A cache that is missing, corrupt, unsafe, or does not match what the caller asked for."""


class CacheMismatch(CacheError):
    """A cache made with other settings: ``field`` (e.g. ``params.bf16``), the cache's value
    ``have`` and the caller's ``want`` (see :mod:`maskteacher.cache_format.identity`)."""

    def __init__(self, message: str, field: str, have: object, want: object) -> None:
        super().__init__(message)
        self.field, self.have, self.want = field, have, want


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an OSError (disk full, read-only folder, name too long, ...) raised inside the block
    into one CacheError line: ``cannot write <what>: <reason> (<file>)``."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise CacheError(f"cannot write {what}: {reason}{where}") from None
