"""The read-ahead thread of a run."""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import ArrowQuantError
from ..sources.base import ModelSource
from .buffers import BufferPool, Leases


RETAIN_FRACTION = 32


class Prefetcher:
    """Reads, in a thread of its own, every unit the pipeline will quantize,
    in order, ahead of the quantizer, holding at most `budget` bytes of read
    buffers (but always at least one unit).

    A read marked pooled goes into a buffer of the run's read pool; the
    consumer hands it back with `recycle` once the engine is done with it, so
    the next read reuses pages already resident (no page faults). Other reads
    (a whole chunk kept as output or for a redo) get a buffer of their own."""

    def __init__(self, source: ModelSource,
                 reads: Sequence[Tuple[int, int, str, int, int, int, bool]], budget: int):
        self.source = source
        # (tensor index, chunk index, name, row, rows, bytes, pooled)
        self.reads = list(reads)
        self.budget = budget
        # Pooled buffers all have the size of the largest pooled unit, so any
        # one fits any read; the budget counts that size per pooled unit (a
        # small unit pins a whole buffer). Two free buffers are enough: the
        # one the engine gave back and the one the reader takes next.
        # The free buffers kept are at most 1/RETAIN_FRACTION of the bytes the
        # run reads: a small model reads few units and keeps none (its RSS as
        # without a pool), a large one keeps two and faults its pages once.
        self.unit_bytes = max((r[5] for r in self.reads if r[6]), default=0)
        total = sum(r[5] for r in self.reads)
        self.leases = Leases(BufferPool(keep=2, keep_bytes=total // RETAIN_FRACTION))
        self._count = collections.Counter((ti, ci) for ti, ci, *_ in self.reads)
        self._cond = threading.Condition()
        self._ready: "collections.deque[Tuple[int, int, int, Any, int]]" = collections.deque()
        self._held = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="arrowquant-reader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        for ti, ci, name, row, n, nbytes, pooled in self.reads:
            held = self.unit_bytes if pooled else nbytes
            with self._cond:
                while not self._stop and self._held and self._held + held > self.budget:
                    self._cond.wait()
                if self._stop:
                    return
                self._held += held
            try:
                if pooled:
                    base = self.leases.pool.take(self.unit_bytes)
                    item: Any = self.leases.lend(self.source.read(name, row, n, out=base), base)
                else:
                    item = self.source.read(name, row, n, out=np.empty(nbytes, dtype=np.uint8))
            except BaseException as exc:  # handed to the consumer at this position
                item = exc
            with self._cond:
                self._ready.append((ti, ci, row, item, held))
                self._cond.notify_all()

    def units(self, ti: int, ci: int) -> Iterator[Tuple[int, np.ndarray]]:
        """The units of chunk (ti, ci), as (row offset in the chunk, bytes)."""
        first_row: Optional[int] = None
        for _ in range(self._count[(ti, ci)]):
            with self._cond:
                while not self._ready:
                    if not self._thread.is_alive():
                        raise ArrowQuantError("the reader stopped before the end of the model")
                    self._cond.wait(timeout=0.5)
                got_ti, got_ci, row, item, held = self._ready.popleft()
                assert (got_ti, got_ci) == (ti, ci), "units consumed out of order"
                self._held -= held
                self._cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            if first_row is None:
                first_row = row
            yield row - first_row, item

    def recycle(self, unit: np.ndarray) -> None:
        """A pooled unit the consumer is done with (others are ignored)."""
        self.leases.give_back(unit)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
        self.leases.clear()
