"""JSON in a cache: bounded parsing, typed field access, atomic writes that follow the umask.

Every JSON document a reader parses (header, manifest, sidecars, zarr metadata, shard tables)
may come from someone else, so parsing is bounded (:data:`MAX_JSON_BYTES`; nesting deeper than
Python's recursion limit is a :class:`CacheError`, never a RecursionError), ``NaN`` /
``Infinity`` are refused, and every field is type-checked with :func:`get`. Free-form objects
(``params``, ``quant``) are additionally limited to :data:`MAX_FREE_DEPTH` levels.

Files are written through a temporary file in the same folder, fsynced and renamed; the
temporary file is created with mode 0666 so the process umask decides the permissions, like
any other tool (``tempfile.mkstemp`` would make every cache file 0600).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from maskteacher.cache_format.errors import CacheError

#: Largest JSON document a reader parses (a format-2 manifest is a few MB even at SA-1B scale).
MAX_JSON_BYTES = 256 * 2**20
#: Deepest nesting allowed inside free-form objects (``params``, ``quant``).
MAX_FREE_DEPTH = 8


def parse_json(raw: bytes, where: str, *, limit: int | None = None) -> Any:
    """Parse UTF-8 JSON ``raw``; CacheError (naming ``where``) on anything malformed or too big."""
    limit = MAX_JSON_BYTES if limit is None else limit
    if len(raw) > limit:
        raise CacheError(f"{where}: {len(raw)} bytes of JSON, more than the {limit} accepted")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise CacheError(f"{where}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CacheError(f"{where}: not valid JSON ({exc})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def read_json_file(path: str, what: str) -> Any:
    """Parse a local JSON file; CacheError names ``what`` and the path when it is unreadable."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise CacheError(
                f"{path}: {size} bytes of JSON, more than the {MAX_JSON_BYTES} accepted"
            )
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CacheError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CacheError(f"cannot read {what} {path}: {exc.strerror}") from None
    return parse_json(raw, path)


def dumps(data: Any) -> str:
    """The JSON text every cache document is written as (no NaN, stable key order of dicts)."""
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    write_bytes_atomic(path, dumps(data).encode())


def write_bytes_atomic(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically; the file mode follows the umask."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}"
    )
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Typed access (a document may come from someone else: check every type)


def as_dict(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CacheError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """``d[key]`` checked to be of ``typ`` (a bool is never taken for an int or a float)."""
    if key not in d:
        raise CacheError(f"{where}: missing field {key!r}")
    value = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = "/".join(t.__name__ for t in types)
        raise CacheError(f"{where}: field {key!r} must be {want}, got {value!r}")
    return value


def str_map(d: dict[str, Any], where: str) -> dict[str, str]:
    if any(not isinstance(v, str) for v in d.values()):
        raise CacheError(f"{where}: values must be strings")
    return dict(d)


def free_object(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A free-form JSON object field, at most :data:`MAX_FREE_DEPTH` levels deep."""
    value = get(d, key, dict, where)
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_FREE_DEPTH:
            raise CacheError(f"{where}: field {key!r} is nested more than {MAX_FREE_DEPTH} deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value
