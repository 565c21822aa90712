"""Shared helpers for the dataset readers: bad-item bookkeeping, file listing, annotation JSON
reading (parsed and digested in one read), progress bars. Every failure becomes a
:class:`~maskteacher.errors.UserError` whose one line names the file and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm import tqdm

from maskteacher.errors import UserError

log = logging.getLogger("maskteacher.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Show a progress bar when an open-time scan or a stats pass covers at least this many items.
PROGRESS_MIN_ITEMS = 200
# How many skipped items are logged one by one before the rest is only counted.
_MAX_LOGGED_BAD = 10
# Size of the content digests (blake2b) of annotation files and image samples.
DIGEST_BYTES = 16

T = TypeVar("T")
BadKind = Literal["image", "annotation"]


class BadItem(Exception):
    """One item of a dataset is unusable; ``item`` names the file (or id), ``reason`` says why.

    ``kind`` is the file at fault: ``image`` (missing, unreadable or ambiguous image file) or
    ``annotation`` (missing, unparsable, corrupt or mis-sized annotation / mask file).
    Internal to the readers: with ``skip_bad`` it is recorded, otherwise it becomes a UserError.
    """

    def __init__(self, item: str | Path, reason: str, *, kind: BadKind = "annotation") -> None:
        super().__init__(f"{item}: {reason}")
        self.item = str(item)
        self.reason = reason
        self.kind = kind


class BadItemLog:
    """Collects bad items while a reader scans a dataset (the ``skip_bad`` policy).

    ``handle(bad)`` raises a UserError unless ``skip_bad``; with it, the item is logged as a
    warning (the first few one by one) and appended to ``items`` ((item, reason) pairs) and
    ``kinds`` (its :class:`BadItem` kind, same order).
    """

    def __init__(self, *, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[tuple[str, str]] = []
        self.kinds: list[BadKind] = []

    def handle(self, bad: BadItem) -> None:
        if not self.skip_bad:
            raise UserError(
                f"{bad.item}: {bad.reason} (pass skip_bad / --skip-bad to skip such items)"
            )
        self.items.append((bad.item, bad.reason))
        self.kinds.append(bad.kind)
        if len(self.items) <= _MAX_LOGGED_BAD:
            log.warning("skipping bad item %s: %s", bad.item, bad.reason)

    def summarise(self, root: Path) -> None:
        if len(self.items) > _MAX_LOGGED_BAD:
            log.warning(
                "skipped %d bad items in %s (the dataset's bad_items lists them all)",
                len(self.items),
                root,
            )


def progress(items: Sequence[T] | Iterable[T], *, total: int, desc: str) -> Iterator[T]:
    """``tqdm`` over ``items`` when there are enough of them to be worth a bar."""
    return iter(
        tqdm(items, total=total, desc=desc, leave=False, disable=total < PROGRESS_MIN_ITEMS)
    )


def visible_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files in ``folder`` whose suffix (case-insensitive) is one of ``suffixes``, skipping hidden
    names such as macOS ``._x.jpg`` resource forks."""
    return [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
    ]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders ``2.png`` before ``10.png`` (digit runs compare as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def digest(data: bytes) -> bytes:
    """The content digest used for dataset fingerprints (blake2b, DIGEST_BYTES bytes)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def read_file(path: Path, what: str) -> bytes:
    """All bytes of an annotation file; BadItem (kind ``annotation``) when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadItem(path, f"{what} not found") from None
    except OSError as exc:
        raise BadItem(path, f"cannot read {what} ({exc})") from None


def read_json(path: Path) -> tuple[Any, bytes]:
    """(parsed JSON, digest of the file's bytes) from one read; BadItem names the parse error."""
    raw = read_file(path, "annotation file")
    try:
        return json.loads(raw), digest(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadItem(path, f"annotation JSON does not parse ({exc})") from None
    except RecursionError:
        raise BadItem(path, "annotation JSON is nested too deeply to parse") from None
