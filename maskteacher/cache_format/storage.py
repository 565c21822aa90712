"""Byte access to a cache folder: local files (``os.pread``, ``mmap``) or an fsspec URL.

Handles (file descriptors) belong to one process: after a fork (DataLoader workers) the first
access in the child drops the inherited ones and opens its own. At most :data:`MAX_OPEN_FILES`
descriptors stay open per source (least recently used are closed), so reading every shard of an
SA-1B-sized cache does not run out of descriptors or grow memory. Every path is a '/'-separated
path relative to the cache root, checked to stay inside it (symlinks included).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import OrderedDict
from typing import IO, Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.paths import check_relative_path, resolve_local

#: File descriptors a local source keeps open (least recently used beyond this are closed).
MAX_OPEN_FILES = 64


class ByteSource:
    """Read-only access to the files of one cache root."""

    root: str

    def read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of file ``rel``; CacheError if the file is missing or short."""
        raise NotImplementedError

    def read_all(self, rel: str) -> bytes:
        raise NotImplementedError

    def buffer(self, rel: str) -> Any:
        """The whole file as a read-only buffer (a memory map for local files)."""
        return self.read_all(rel)

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def open_binary(self, rel: str) -> IO[bytes]:
        """A seekable binary file object (for h5py and hashing)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root


class LocalSource(ByteSource):
    """A cache folder on a local (or mounted) file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()

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
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        fd = self._open(rel)
        self._fds[rel] = fd
        while len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _open(self, rel: str) -> int:
        try:
            return os.open(self.path(rel), os.O_RDONLY)
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None
        except OSError as exc:
            raise CacheError(f"cannot open {self.describe(rel)}: {exc.strerror}") from None

    def read(self, rel: str, start: int, end: int) -> bytes:
        n = end - start
        try:
            data = os.pread(self._fd(rel), n, start)
        except (OverflowError, ValueError):  # a corrupted offset or length
            raise CacheError(f"{self.describe(rel)}: bad byte range {start}..{end}") from None
        if len(data) != n:
            raise CacheError(
                f"{self.describe(rel)} is truncated: wanted bytes {start}..{end}, file ends sooner"
            )
        return data

    def read_all(self, rel: str) -> bytes:
        with self.open_binary(rel) as f:
            return f.read()

    def buffer(self, rel: str) -> Any:
        fd = self._open(rel)
        try:
            if os.fstat(fd).st_size == 0:
                return b""
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def size(self, rel: str) -> int:
        return os.fstat(self._fd(rel)).st_size

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def open_binary(self, rel: str) -> IO[bytes]:
        try:
            return open(self.path(rel), "rb")
        except FileNotFoundError:
            raise CacheError(f"missing file {self.describe(rel)}") from None
        except OSError as exc:
            raise CacheError(f"cannot open {self.describe(rel)}: {exc.strerror}") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()


class FsspecSource(ByteSource):
    """A cache behind an fsspec URL (``s3://``, ``gs://``, ``http://``, ``memory://``, ...)."""

    def __init__(self, url: str) -> None:
        import fsspec.core

        self.root = url
        try:
            self._fs, self._base = fsspec.core.url_to_fs(url)
        except ImportError as exc:  # fsspec names the package(s) the protocol needs
            proto = url.split("://", 1)[0]
            raise CacheError(
                f"{url}: no fsspec backend for {proto}:// URLs is installed ({exc}); "
                "install it with pip"
            ) from None
        except ValueError as exc:
            raise CacheError(
                f"{url}: unknown URL scheme ({exc}); use a local folder or an fsspec URL "
                "(s3://, gs://, http://, ...)"
            ) from None
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


def make_source(path_or_url: str | os.PathLike[str]) -> ByteSource:
    """Local folder path (or ``file://`` URL) -> :class:`LocalSource`; other URLs -> fsspec
    (CacheError naming the package to install when the URL's backend is missing)."""
    text = os.fspath(path_or_url)
    if text.startswith("file://"):
        return LocalSource(text[len("file://") :])
    if "://" in text:
        return FsspecSource(text)
    return LocalSource(text)
