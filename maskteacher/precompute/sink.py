"""A background thread that encodes and writes cache shards while the teacher keeps computing.

Encoding a record (int8 quantisation, zstd, checksums) costs ~0.1 s of CPU per image of 100
masks; done inline it would leave the accelerator idle for that long per image. The
:class:`ShardSink` takes records from the main thread through a bounded queue and writes them
with one :class:`~maskteacher.cache_format.ShardWriter` at a time, in order. An error in the
thread is raised in the main thread at its next call; :meth:`ShardSink.abort` discards the shard
being written (as the writer's ``with`` block would).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from maskteacher.cache_format import CacheRecord, ShardWriter, record_failure
from maskteacher.cache_format.manifest import ShardEntry

_STOP = object()


@dataclass
class SinkStats:
    """What the sink wrote: finished shards (with their manifest entries) and failures; ``empty``
    (set by the generation loop): written images on which the teacher kept no mask."""

    shards: list[ShardEntry] = field(default_factory=list)
    failures: int = 0
    empty: int = 0

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def masks(self) -> int:
        return sum(s.masks for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


class ShardSink:
    """Ordered shard writing on a worker thread (see the module docstring).

    ``begin(split, name_fn)`` starts a shard (``name_fn()`` picks its name when the thread gets
    there), ``add(record)`` appends, ``end()`` finishes it, ``fail(...)`` records a failed image.
    ``close()`` waits for everything and returns the :class:`SinkStats`.
    """

    def __init__(self, root: str | os.PathLike[str], worker_name: str, *, depth: int = 16) -> None:
        self.root = os.fspath(root)
        self.worker_name = worker_name
        self.stats = SinkStats()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._writer: ShardWriter | None = None
        self._thread = threading.Thread(target=self._run, name="shard-sink", daemon=True)
        self._thread.start()

    # -- main thread ---------------------------------------------------------------------------

    def begin(self, split: str, name_fn: Callable[[], str]) -> None:
        self._put(("begin", split, name_fn))

    def add(self, record: CacheRecord) -> None:
        self._put(("add", record))

    def end(self) -> None:
        self._put(("end",))

    def fail(self, image_id: str, split: str, reason: str) -> None:
        self._put(("fail", image_id, split, reason))

    def close(self) -> SinkStats:
        """Finish the current shard, stop the thread, re-raise its error if any."""
        self.end()
        self._put(_STOP)
        self._thread.join()
        self._raise()
        return self.stats

    def abort(self) -> None:
        """Stop without finishing: the shard being written is discarded. Never raises."""
        self._put(("abort",), check=False)
        self._put(_STOP, check=False)
        self._thread.join()

    def _put(self, op: Any, *, check: bool = True) -> None:
        while True:
            if check:
                self._raise()
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(op, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is _STOP:
                return
            if self._error is not None:
                continue  # drain: the main thread will see the error
            try:
                self._apply(op)
            except BaseException as exc:
                self._error = exc
                self._discard()

    def _apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "begin":
            self._finish()
            _, split, name_fn = op
            self._writer = ShardWriter(self.root, name_fn(), split=split)
        elif kind == "add":
            assert self._writer is not None, "add() before begin()"
            self._writer.add(op[1])
        elif kind == "end":
            self._finish()
        elif kind == "fail":
            _, image_id, split, reason = op
            record_failure(self.root, self.worker_name, image_id, split, reason)
            self.stats.failures += 1
        elif kind == "abort":
            self._discard()

    def _finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            entry = writer.close()
            if entry is not None:
                self.stats.shards.append(entry)

    def _discard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()
