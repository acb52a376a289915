"""The read-ahead thread of a run."""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import ArrowQuantError
from ..sources.base import ModelSource


class Prefetcher:
    """Reads, in a thread of its own, every unit the pipeline will quantize,
    in order, ahead of the quantizer, holding at most `budget` bytes of read
    buffers (but always at least one unit)."""

    def __init__(self, source: ModelSource, reads: Sequence[Tuple[int, int, str, int, int, int]],
                 budget: int):
        self.source = source
        self.reads = list(reads)   # (tensor index, chunk index, name, row, rows, bytes)
        self.budget = budget
        self._count = collections.Counter((ti, ci) for ti, ci, *_ in self.reads)
        self._cond = threading.Condition()
        self._ready: "collections.deque[Tuple[int, int, int, Any]]" = collections.deque()
        self._held = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="arrowquant-reader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        for ti, ci, name, row, n, nbytes in self.reads:
            with self._cond:
                while not self._stop and self._held and self._held + nbytes > self.budget:
                    self._cond.wait()
                if self._stop:
                    return
                self._held += nbytes
            try:
                item: Any = self.source.read(name, row, n, out=np.empty(nbytes, dtype=np.uint8))
            except BaseException as exc:  # handed to the consumer at this position
                item = exc
            with self._cond:
                self._ready.append((ti, ci, row, item))
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
                got_ti, got_ci, row, item = self._ready.popleft()
                assert (got_ti, got_ci) == (ti, ci), "units consumed out of order"
                if not isinstance(item, BaseException):
                    self._held -= item.nbytes
                self._cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            if first_row is None:
                first_row = row
            yield row - first_row, item

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
