"""The teacher's prompt encoder + mask decoder weights inside a cache: ``teacher_decoder.npz``.

A cache that stores image embeddings also stores the weights that decode prompts on them, so
that a shared cache is self-contained: a receiver can run the teacher's decoder for its own
prompts (prompt-dependent distillation) without the teacher's checkpoint. The file is an
uncompressed NumPy ``.npz`` archive at the cache root: one float32 (or integer) array per
state-dict entry whose name starts with ``prompt_encoder.`` or ``mask_decoder.``, read with
``numpy.load(allow_pickle=False)`` -- plain arrays, never code. The manifest records it as
``teacher_decoder`` (path, bytes, sha256, number of arrays, :class:`DecoderFile`); a reader
checks size and sha256 before use, and ``cache verify`` checks them too. Its content belongs to
the teacher the header names (``teacher.checkpoint_sha256``): precompute writes it from the
teacher it runs. Caches without the entry (made before it, or without embeddings) stay readable.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskteacher.cache_format.errors import CacheError, os_errors
from maskteacher.cache_format.jsonio import as_dict, get
from maskteacher.cache_format.paths import check_relative_path, resolve_local
from maskteacher.cache_format.storage import ByteSource

DECODER_FILE = "teacher_decoder.npz"
#: Names of the stored arrays: state-dict keys of the prompt encoder and the mask decoder.
NAME_RE = re.compile(r"^(prompt_encoder|mask_decoder)\.[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class DecoderFile:
    """The manifest's ``teacher_decoder`` entry: file path (relative), size, sha256, arrays."""

    path: str
    bytes: int
    sha256: str
    arrays: int

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "arrays": self.arrays,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> DecoderFile:
        d = as_dict(data, where)
        return cls(
            path=check_relative_path(get(d, "path", str, where), f"{where}: path"),
            bytes=get(d, "bytes", int, where),
            sha256=get(d, "sha256", str, where),
            arrays=get(d, "arrays", int, where),
        )


def encode_decoder_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of ``arrays`` (names checked against :data:`NAME_RE`, numeric dtypes
    only, in name order so the same weights always give the same bytes)."""
    if not arrays:
        raise CacheError("teacher decoder weights: no arrays given")
    checked = {}
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        if not NAME_RE.match(name):
            raise CacheError(f"teacher decoder weights: bad array name {name!r}")
        if value.dtype.kind not in "fiub":
            raise CacheError(f"teacher decoder weights: {name} has dtype {value.dtype}")
        checked[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **checked)
    return buffer.getvalue()


def write_decoder_weights(root: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``teacher_decoder.npz`` into the cache folder ``root`` (temporary name, then
    rename). A file already there must hold the same bytes (every worker of one cache runs the
    same teacher); other bytes are a CacheError."""
    _write_bytes(root, encode_decoder_arrays(arrays))


def copy_decoder_file(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> bool:
    """``cache merge``: copy the local cache ``src``'s ``teacher_decoder.npz`` (if any, checked
    to be plain arrays and to resolve inside ``src``) into ``out``; True when there was one."""
    src = os.fspath(src)
    if not os.path.exists(os.path.join(src, DECODER_FILE)):
        return False
    path = resolve_local(src, DECODER_FILE, src)
    with open(path, "rb") as f:
        data = f.read()
    _load(data, path)
    _write_bytes(out, data)
    return True


def _write_bytes(root: str | os.PathLike[str], data: bytes) -> None:
    path = os.path.join(os.fspath(root), DECODER_FILE)
    with os_errors(f"teacher decoder weights {path}"):
        _write_new(path, data)


def _write_new(path: str, data: bytes) -> None:
    if os.path.exists(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).digest() != hashlib.sha256(data).digest():
                raise CacheError(
                    f"{path} holds other teacher decoder weights than this run's teacher; "
                    "use another cache folder"
                )
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def decoder_file_entry(root: str | os.PathLike[str]) -> DecoderFile | None:
    """The manifest entry of the cache folder's ``teacher_decoder.npz`` (None: there is none)."""
    path = os.path.join(os.fspath(root), DECODER_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    arrays = _load(data, path)
    return DecoderFile(DECODER_FILE, len(data), hashlib.sha256(data).hexdigest(), len(arrays))


def _load(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise CacheError(f"{where}: not a readable .npz of plain arrays ({exc})") from None
    bad = [n for n in arrays if not NAME_RE.match(n)]
    if bad:
        raise CacheError(f"{where}: unexpected array {bad[0]!r}")
    return arrays


def read_decoder_weights(source: ByteSource, entry: DecoderFile) -> dict[str, np.ndarray]:
    """The arrays of a cache's ``teacher_decoder.npz``, after checking its size and sha256
    against the manifest's ``entry`` (CacheError naming the file otherwise)."""
    where = source.describe(entry.path)
    data = source.read_all(entry.path)
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CacheError(f"{where}: fails its sha256 check (contents changed since the manifest)")
    arrays = _load(data, where)
    if len(arrays) != entry.arrays:
        raise CacheError(f"{where}: holds {len(arrays)} arrays, the manifest says {entry.arrays}")
    return arrays
