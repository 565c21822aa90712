"""Byte access to a cache folder: local files (``os.pread``) or an fsspec URL.

Handles (file descriptors) belong to one process: after a fork (DataLoader workers) the first
access in the child drops the inherited ones and opens its own. Every path is a '/'-separated
path relative to the cache root, checked to stay inside it.
"""

from __future__ import annotations

import contextlib
import os
from typing import IO, Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.manifest import check_relative_path, resolve_local


class ByteSource:
    """Read-only access to the files of one cache root."""

    root: str

    def read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``rel``; CacheError if the file is missing or short."""
        raise NotImplementedError

    def read_all(self, rel: str) -> bytes:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def open_binary(self, rel: str) -> IO[bytes]:
        """A seekable binary file object (for h5py)."""
        raise NotImplementedError

    def describe(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root


class LocalSource(ByteSource):
    """A cache folder on a local (or mounted) file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def path(self, rel: str) -> str:
        return resolve_local(self.root, rel, self.root)

    def _fd(self, rel: str) -> int:
        if self._pid != os.getpid():
            # inherited from the parent: closing our copies does not touch the parent's
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(rel)
        if fd is None:
            try:
                fd = os.open(self.path(rel), os.O_RDONLY)
            except FileNotFoundError:
                raise CacheError(f"missing file {self.describe(rel)}") from None
            except OSError as exc:
                raise CacheError(f"cannot open {self.describe(rel)}: {exc.strerror}") from None
            self._fds[rel] = fd
        return fd

    def read(self, rel: str, start: int, end: int) -> bytes:
        n = end - start
        data = os.pread(self._fd(rel), n, start)
        if len(data) != n:
            raise CacheError(
                f"{self.describe(rel)} is truncated: wanted bytes {start}..{end}, file ends sooner"
            )
        return data

    def read_all(self, rel: str) -> bytes:
        try:
            with open(self.path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None

    def size(self, rel: str) -> int:
        return os.fstat(self._fd(rel)).st_size

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def open_binary(self, rel: str) -> IO[bytes]:
        try:
            return open(self.path(rel), "rb")
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


class FsspecSource(ByteSource):
    """A cache behind an fsspec URL (``s3://``, ``gs://``, ``http://``, ``memory://``, ...)."""

    def __init__(self, url: str) -> None:
        import fsspec.core

        self.root = url
        self._fs, self._base = fsspec.core.url_to_fs(url)
        self._base = self._base.rstrip("/")

    def _p(self, rel: str) -> str:
        check_relative_path(rel, self.root)
        return f"{self._base}/{rel}"

    def read(self, rel: str, start: int, end: int) -> bytes:
        try:
            data = self._fs.cat_file(self._p(rel), start=start, end=end)
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None
        if len(data) != end - start:
            raise CacheError(f"{self.describe(rel)} is truncated: wanted bytes {start}..{end}")
        return bytes(data)

    def read_all(self, rel: str) -> bytes:
        try:
            return bytes(self._fs.cat_file(self._p(rel)))
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None

    def size(self, rel: str) -> int:
        try:
            return int(self._fs.size(self._p(rel)))
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None

    def exists(self, rel: str) -> bool:
        return bool(self._fs.exists(self._p(rel)))

    def open_binary(self, rel: str) -> IO[bytes]:
        try:
            return self._fs.open(self._p(rel), "rb")
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None

    def close(self) -> None:
        pass


def make_source(path_or_url: str | os.PathLike[str]) -> ByteSource:
    """Local folder path (or ``file://`` URL) -> :class:`LocalSource`; other URLs -> fsspec."""
    text = os.fspath(path_or_url)
    if text.startswith("file://"):
        return LocalSource(text[len("file://") :])
    if "://" in text:
        return FsspecSource(text)
    return LocalSource(text)
