"""Locks in a cache folder: one writer per shard, one writer per slice of the work, short
critical sections (header, finalize).

:class:`ExclusiveLock` is a lock *file* created with ``O_CREAT|O_EXCL`` and held with an
exclusive ``flock``; it records the holder (pid, host, start time, and whatever the caller adds)
and is removed on release. A lock file nobody holds (its process died, even by SIGKILL: the
kernel dropped the flock) is taken over. If the holder is alive, CacheError names its pid and
host. On a file system where flock does not work across hosts, remove a lock by hand once its
process is certainly gone.

Writer locks (``.writer-<name>.lock`` at the cache root) make ``maskteacher precompute`` one
writer per slice: a second process for the same slice, or a process that splits the work
differently (another ``--num-shards`` or torchrun world size) while others run, is refused --
two processes planning the same images would write them twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from maskteacher.cache_format.errors import CacheError

WRITER_PREFIX = ".writer-"


class ExclusiveLock:
    """Hold ``path`` exclusively (see the module docstring); ``info`` is stored in the file."""

    def __init__(self, path: str, what: str, info: dict[str, Any] | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        payload = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        payload.update(info or {})
        for _ in range(20):
            fd = self._open(path)
            if fd is None:
                continue  # released meanwhile: try to create it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_text(fd)
                os.close(fd)
                raise CacheError(
                    f"{what} is being written by another process ({holder or 'unknown'}); lock file {path}"
                ) from None
            if not _same_file(path, fd):  # the holder released (unlinked) it in between
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(payload).encode(), 0)
            self._fd = fd
            return
        raise CacheError(f"could not take lock {path}")

    @staticmethod
    def _open(path: str) -> int | None:
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            try:
                return os.open(path, os.O_RDWR)
            except FileNotFoundError:
                return None
        except OSError as exc:
            raise CacheError(f"cannot create lock file {path}: {exc.strerror}") from None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def read_text(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def short_lock(path: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold ``path`` (flock) for a short read-modify-write; the file is removed on release, so
    no lock file outlives its holder (a waiter that opened the removed file tries again)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise CacheError(f"timed out waiting for {path}") from None
            time.sleep(0.05)
            continue
        if _same_file(path, fd):
            break
        os.close(fd)  # the previous holder removed it between our open and flock
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# One writer per slice of the work


def live_writers(root: str) -> list[dict[str, Any]]:
    """What the writer locks held right now at ``root`` say (pid, host, slice, partition)."""
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not (name.startswith(WRITER_PREFIX) and name.endswith(".lock")):
            continue
        try:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a live writer
            try:
                out.append({"lock": name, **json.loads(read_text(fd) or "{}")})
            except json.JSONDecodeError:
                out.append({"lock": name})
        finally:
            os.close(fd)
    return out


def writer_lock(root: str, slice_name: str, partition: str) -> ExclusiveLock:
    """Take the writer lock of ``slice_name`` (e.g. ``worker0003-of-0008``) for a run that splits
    the work as ``partition`` (e.g. ``8 workers``); CacheError when another live process holds
    this slice or splits the work differently."""
    with short_lock(os.path.join(root, ".writers.lock")):
        for other in live_writers(root):
            if other.get("partition") not in (None, partition):
                raise CacheError(
                    f"cache {root} is being written by another process (pid {other.get('pid')} on "
                    f"{other.get('host')}) that splits the work as {other.get('partition')}, this run "
                    f"as {partition}; wait for it to finish, or use the same --num-shards"
                )
        path = os.path.join(root, f"{WRITER_PREFIX}{slice_name}.lock")
        return ExclusiveLock(
            path, f"cache {root} slice {slice_name}", {"slice": slice_name, "partition": partition}
        )
