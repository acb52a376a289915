"""The work units of a Ray run and the task that quantizes one
(run/ray_executor.py is the driver; docs/ray.md). A unit is a run of
consecutive chunks of one input file; the task opens the input at the
driver's path (checked: same files, sizes and tensor table), reads its rows
ahead in a thread as one machine does, quantizes them with
StreamingQuantizer's chunk steps and returns each chunk's record and the
info its staged part holds. Ray is not imported here: the driver wraps
run_unit in a remote function."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine.dtypes import itemsize
from ..errors import ArrowQuantError, ConfigurationError, FormatError
from ..formats.v2_schema import ChunkRecord
from ..planning.plan import TensorPlan
from ..sources.base import ModelSource, TensorInfo
from ..version import __version__
from .layout import Chunk, PipelineOptions, chunk_buffer_bytes
from .prefetch import Prefetcher
from .layout import chunk_reads, read_ahead_budget
from .streaming import StreamingQuantizer

#: Test hook: "N:MARKER" makes the task of work unit N kill its own process
#: (SIGKILL) after its first chunk, once (MARKER records that it did).
KILL_ENV = "ARROWQUANT_RAY_TEST_KILL"
#: Source bytes a work unit gathers, at most (and at most --chunk-size): the
#: consecutive chunks of one file; a larger chunk is a unit of its own: small enough to balance two workers on a
#: 600M model, large enough that a task's fixed cost (milliseconds) is small
#: beside reading it (benches/README.md, "Ray").
UNIT_BYTES = 64 * 1024 * 1024
#: Memory a task needs besides its buffers (interpreter, engine scratch, Ray).
TASK_BASE_MEMORY = 64 * 1024 * 1024


# ---------------------------------------------------------------- work units


@dataclass
class UnitChunk:
    """One chunk a task quantizes, with the plan (width) it is done at."""

    ti: int
    chunk: Chunk
    unit_rows: int
    plan: TensorPlan
    single: bool                      # the tensor's only chunk (redone in place on a floor)


@dataclass
class WorkUnit:
    index: int
    file: str
    chunks: List[UnitChunk]
    nbytes: int                       # source bytes
    memory: int                       # Ray memory= of its task


@dataclass(frozen=True)
class UnitContext:
    """What every task needs, put in the object store once."""

    input: str
    opts: PipelineOptions             # threads: the task's engine threads
    files: Tuple[Tuple[str, int], ...]  # (path, size) of each weight file
    table: str                        # digest of the tensor table
    version: str
    kill_unit: Optional[Tuple[int, str]]


@dataclass
class UnitResult:
    index: int
    chunks: List[Tuple[int, int, ChunkRecord, Dict[str, Any]]]  # (ti, ci, record, part info)
    worker: str
    start: float
    end: float
    peak_rss: int
    # The first chunk that failed (bad input): (ti, ci, the error), raised
    # by the driver when the run reaches that chunk, as one machine would.
    error: Optional[Tuple[int, int, ArrowQuantError]] = None
    cpu_seconds: float = 0.0          # the worker process's CPU time during the task


def tensor_table(tensors: List[TensorInfo]) -> str:
    rows = [[t.name, list(t.shape), t.dtype, t.nbytes] for t in tensors]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def chunk_source_bytes(t: TensorInfo, c: Chunk) -> int:
    return c.row_count * t.cols * itemsize(t.dtype) if t.rows else t.nbytes


def unit_memory(source: ModelSource, chunks: List[UnitChunk], opts: PipelineOptions) -> int:
    """Ray memory= of a task: the outputs it holds until it returns (twice:
    once more while they are serialized), its read buffers (the read ahead
    and the unit being quantized) and a fixed base."""
    out = 0
    reads = 0
    for uc in chunks:
        t = source.tensors[uc.ti]
        widest = uc.plan if uc.plan.bits is None else dataclasses.replace(
            uc.plan, bits=max([uc.plan.bits, *uc.plan.fallback_bits]))
        out += chunk_buffer_bytes(t, widest, uc.chunk.row_count)
        reads = max(reads, min(uc.unit_rows, max(1, uc.chunk.row_count)) * t.cols * itemsize(t.dtype))
    return 2 * out + reads + read_ahead_budget(opts) + TASK_BASE_MEMORY


def group_units(source: ModelSource, pending: List[UnitChunk], unit_bytes: int,
                opts: PipelineOptions, first_index: int) -> List[WorkUnit]:
    """Consecutive chunks (in the run's order) of one input file, up to
    unit_bytes of source per unit (a larger chunk is a unit of its own)."""
    units: List[WorkUnit] = []
    cur: List[UnitChunk] = []
    cur_file, cur_bytes = "", 0
    prev: Optional[Tuple[int, int]] = None

    def close() -> None:
        if cur:
            units.append(WorkUnit(first_index + len(units), cur_file, list(cur), cur_bytes,
                                  unit_memory(source, cur, opts)))
            cur.clear()

    for uc in pending:
        t = source.tensors[uc.ti]
        f = source.location(t.name)
        n = chunk_source_bytes(t, uc.chunk)
        follows = prev is not None and (uc.ti, uc.chunk.index) in (
            (prev[0], prev[1] + 1), (prev[0] + 1, 0))
        if not cur or f != cur_file or not follows or cur_bytes + n > unit_bytes:
            close()
            cur_file, cur_bytes = f, 0
        cur.append(uc)
        cur_bytes += n
        prev = (uc.ti, uc.chunk.index)
    close()
    return units


# ---------------------------------------------------------------- the task


_SOURCE: Dict[str, Any] = {}


def _worker_source(ctx: UnitContext) -> ModelSource:
    """The input, opened once per worker process and checked against the
    driver's view of it (same files, same sizes, same tensor table)."""
    key = json.dumps([ctx.input, ctx.files, ctx.table])
    if _SOURCE.get("key") == key:
        return _SOURCE["source"]
    if ctx.version != __version__:
        raise ConfigurationError(f"{socket.gethostname()}: arrowquant {__version__} on this Ray "
                                 f"node, {ctx.version} on the driver; install the same version "
                                 "on every node")
    from ..engine import core
    from ..sources import open_model

    old = _SOURCE.pop("source", None)
    if old is not None:
        old.close()
    else:  # first use in this process: what lean_allocators does for a run
        import pyarrow as pa

        core.fix_mmap_threshold()
        pa.set_memory_pool(pa.system_memory_pool())
    for path, size in ctx.files:
        try:
            found = os.stat(path).st_size
        except OSError as exc:
            raise FormatError(f"{path}: not readable on Ray node {socket.gethostname()} ({exc}); "
                              "every node needs the input at the driver's path (docs/ray.md)") \
                from None
        if found != size:
            raise FormatError(f"{path}: {found} bytes on Ray node {socket.gethostname()}, {size} "
                              "on the driver; every node needs the same input files")
    source = open_model(ctx.input)
    if tensor_table(source.tensors) != ctx.table:
        source.close()
        raise FormatError(f"{ctx.input}: the tensors on Ray node {socket.gethostname()} differ "
                          "from the driver's; every node needs the same input files")
    _SOURCE.update(key=key, source=source)
    return source


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _maybe_kill(ctx: UnitContext, unit: WorkUnit) -> None:
    if ctx.kill_unit is None or ctx.kill_unit[0] != unit.index:
        return
    marker = Path(ctx.kill_unit[1])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # killed once already: this is Ray's retry
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def run_unit(ctx: UnitContext, unit: WorkUnit) -> UnitResult:
    """A Ray task: reads and quantizes the unit's chunks (read ahead in a
    thread, as on one machine) and returns their records and part infos."""
    start, cpu = time.time(), time.process_time()
    source = _worker_source(ctx)
    plans = {source.tensors[uc.ti].name: uc.plan for uc in unit.chunks}
    # Its chunk steps only: nothing is written from a task (the out_dir is unused).
    steps = StreamingQuantizer(source, plans, Path(ctx.input), ctx.opts)
    reads = [r for uc in unit.chunks
             for r in chunk_reads(uc.ti, source.tensors[uc.ti], uc.chunk, uc.unit_rows)]
    prefetch = Prefetcher(source, reads, read_ahead_budget(ctx.opts))
    done: List[Tuple[int, int, ChunkRecord, Dict[str, Any]]] = []
    error = None
    try:
        for uc in unit.chunks:
            t = source.tensors[uc.ti]
            decisions: List[str] = []
            try:
                plan, rec, sums = steps.quantize_planned(
                    t, uc.plan, uc.chunk, prefetch.units(uc.ti, uc.chunk.index), uc.single,
                    decisions, unit_rows=uc.unit_rows)
            except ArrowQuantError as exc:
                error = (uc.ti, uc.chunk.index, exc)
                break
            info, _ = steps.chunk_info(uc.ti, t, plan, uc.chunk, rec, sums, decisions)
            rec.arena = None  # the driver gets the record's arrays, not the task's buffer
            done.append((uc.ti, uc.chunk.index, rec, info))
            _maybe_kill(ctx, unit)
    finally:
        prefetch.close()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return UnitResult(unit.index, done, worker, start, time.time(), _peak_rss(), error,
                      time.process_time() - cpu)


