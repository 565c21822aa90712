"""The run folder (``model.save_path``): checked before anything is written, locked while a run
writes it, cleaned of what a killed run left behind.

- :func:`check_save_dir` refuses a path that is a file, or one inside a dataset folder (a run
  writing there would put checkpoints among the dataset's files);
- :class:`RunLock` creates the folder and holds an exclusive ``flock`` on ``.run.lock`` for the
  whole run: a second run into the same folder is refused with one line naming the first run's
  pid (the lock dies with its process, even on SIGKILL, so a crashed run never blocks the next);
- :func:`remove_stale_temp` deletes the temporary files of interrupted atomic writes
  (``.last.pt.tmp-PID``, ``config.yaml.tmp``): under the lock no other writer exists;
- :func:`writing` turns an ``OSError`` while writing (disk full, read-only folder, name too
  long) into one UserError line naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from maskteacher.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".run.lock"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_save_dir(save_dir: Path, *, dataset_paths: Iterable[str | None]) -> None:
    """Refuse a ``model.save_path`` that is a file or lies inside a dataset folder.

    dataset_paths: the dataset locations of the config (folders, or annotation files whose
    folder counts); None entries are skipped.
    """
    with writing(save_dir, "run folder"):  # e.g. a name too long for the file system
        is_file = save_dir.exists() and not save_dir.is_dir()
        target = save_dir.resolve()
    if is_file:
        raise UserError(f"model.save_path {save_dir} is a file; expected a folder for the run")
    for raw in dataset_paths:
        if raw is None or "://" in str(raw):
            continue
        root = Path(raw).resolve()
        if root.is_file():
            root = root.parent
        if _inside(target, root):
            raise UserError(
                f"model.save_path {save_dir} is inside the dataset folder {root}; checkpoints "
                "and logs there would mix with the dataset's files -- choose a folder outside it"
            )


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Run a write of ``what`` at ``path``; an OSError becomes one UserError line."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"cannot write the {what} {path}: {reason} (check free space, permissions and the "
            "length of model.save_path)"
        ) from None


class RunLock:
    """Exclusive lock of a run folder (module docstring); ``acquire`` creates the folder."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir = save_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.save_dir / LOCK
        with writing(self.save_dir, "run folder"):
            self.save_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"model.save_path {self.save_dir} is in use by another training run (pid "
                f"{holder}); give each run its own model.save_path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_stale_temp(save_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes in ``save_dir``; returns what was removed."""
    stale = [p for p in save_dir.glob(".*.tmp-*") if p.is_file()]
    stale += [p for p in save_dir.glob("*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def resume_path(resume: bool | str, last: Path) -> Path | None:
    """The checkpoint a run resumes from: None for ``train.resume: false``; for ``true`` the
    run folder's ``last`` checkpoint when it exists (else None: a fresh start, logged); a path
    as given (a missing file is refused when it is loaded)."""
    if resume is False:
        return None
    if resume is True:
        if not last.is_file():
            log.info("train.resume: true but %s does not exist yet; starting fresh", last)
            return None
        return last
    return Path(resume)
