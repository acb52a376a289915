"""Buffers a run reuses from chunk to chunk: read units and the output
buffers of a chunk come from a pool instead of a fresh allocation each time.

A fresh buffer of 256 KiB or more is a new mapping (the run fixes glibc's
mmap threshold so that freed buffers leave the process): every page of it
faults in and is cleared by the kernel when first written. A pooled buffer
was touched once; reusing it costs no page fault, so the page-fault count
and the system time of a run stop growing with the model size.

The pool holds at most the buffers that were in use at the same time (a
buffer is only created when no free one fits, and the free ones too small
are dropped then), so resident memory stays what the pipeline's in-flight
buffers were before.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..engine import core

ALIGN = 64  # bytes: each view starts a multiple of 64 bytes into its arena


class BufferPool:
    """uint8 buffers handed out by `take` and returned by `give`; at most
    `keep` free buffers (and, when given, `keep_bytes` of them) are kept."""

    def __init__(self, keep: int = 4, keep_bytes: Optional[int] = None):
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._free: List[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created (for tests and benchmarks)

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least nbytes (its contents are undefined)."""
        nbytes = max(1, int(nbytes))
        with self._lock:
            best = -1
            for i, b in enumerate(self._free):
                if b.size >= nbytes and (best < 0 or b.size < self._free[best].size):
                    best = i
            if best >= 0:
                return self._free.pop(best)
            self._free.clear()  # none fits: the smaller ones would only hold memory
            self.allocated += 1
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Returns a buffer from `take`; nothing may use it afterwards."""
        with self._lock:
            held = sum(b.size for b in self._free)
            if len(self._free) < self.keep and (self.keep_bytes is None
                                                or held + buf.size <= self.keep_bytes):
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def carve(arena: np.ndarray, parts: Sequence[Tuple[int, type]]) -> List[np.ndarray]:
    """Views of `arena`, one per (count, dtype), each 64-byte aligned."""
    out: List[np.ndarray] = []
    off = 0
    for count, dtype in parts:
        nbytes = count * np.dtype(dtype).itemsize
        out.append(arena[off:off + nbytes].view(dtype))
        off += _aligned(nbytes)
    return out


def arena_bytes(parts: Sequence[Tuple[int, type]]) -> int:
    """Bytes an arena needs to hold `parts` (see carve)."""
    return sum(_aligned(count * np.dtype(dtype).itemsize) for count, dtype in parts)


class Leases:
    """Which pooled buffer backs an array handed out (by id), so the array
    can be given back by whoever holds it last."""

    def __init__(self, pool: BufferPool):
        self.pool = pool
        self._lent: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def lend(self, view: np.ndarray, base: np.ndarray) -> np.ndarray:
        with self._lock:
            self._lent[id(view)] = (view, base)
        return view

    def give_back(self, view: np.ndarray) -> None:
        """Returns the buffer behind `view` to the pool (a view not lent is ignored)."""
        with self._lock:
            entry = self._lent.pop(id(view), None)
        if entry is not None and entry[0] is view:
            self.pool.give(entry[1])

    def clear(self) -> None:
        with self._lock:
            self._lent.clear()
        self.pool.clear()


@contextlib.contextmanager
def lean_allocators() -> Iterator[None]:
    """Buffers freed by the pipeline go back to the system instead of staying
    resident in an allocator's cache: glibc's mmap threshold is fixed (the
    engine's fix_mmap_threshold) and Arrow allocates from the system pool
    for the run (the previous pool is restored after). Readers opened inside
    allocate from it too."""
    import pyarrow as pa

    core.fix_mmap_threshold()
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)
