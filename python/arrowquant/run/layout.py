"""How a tensor is cut into V2 chunks and read units, and what the run's
buffers need: `--chunk-size` bounds a chunk's source bytes, `--max-memory` the
buffers in flight (three output chunks plus the read buffers). A budget that
cannot hold one row is an error before anything is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..engine.dtypes import itemsize
from ..errors import ConfigurationError, MemoryBudgetError
from ..planning.plan import TensorPlan
from ..sizes import format_size, parse_size
from ..sources.base import TensorInfo
from ..spec import groups_per_row, stored_bytes, superblocks_per_row

READ_UNIT = 16 * 1024 * 1024  # bytes of source per engine call in the native pipeline
# Output chunks in flight: being quantized, queued, being written.
CHUNKS_IN_FLIGHT = 3
# The Parquet writer copies a chunk's row before writing it: its encoder's
# growing buffer and the page it builds (measured with pyarrow 26: about 2.5x
# the row's bytes at the writer's peak, from Arrow's own allocator). Counted
# as this many more chunks, so that --max-memory bounds the whole process.
WRITER_COPIES = 3
# A tensor of at most this many chunks with a quality floor is quantized once
# and held until its cosine is known (they fit where the chunks in flight and
# the writer's copies are counted); a longer one is probed first (quantized
# twice).
HOLD_CHUNKS = 3
# Read units of the pipeline: in flight at once are the one being read (or
# queued), the one being quantized, a free one and a probe's re-read.
UNITS_IN_FLIGHT = 4
# What a run allocates besides its buffers (the Parquet writer's first use,
# thread stacks, Python objects, allocator slack: 10-25 MB measured), reserved
# out of the budget (at most half of it) so that the whole process stays
# within --max-memory.
FIXED_RESERVE = 24 * 1024 * 1024


def read_unit(max_memory: int) -> int:
    """Source bytes per engine call: 16 MiB, less under a small budget (at
    most a sixteenth of it, so the read units take at most a quarter)."""
    return max(64 * 1024, min(READ_UNIT, max_memory // 16))


def sizing_budget(max_memory: int) -> int:
    """The part of --max-memory the buffers are sized from."""
    return max_memory - min(FIXED_RESERVE, max_memory // 2)


@dataclass
class PipelineOptions:
    """Execution settings of a run (what to do with each tensor is in its plan)."""

    threads: int = 0
    max_memory: int = 256 * 1024 * 1024
    chunk_size: int = 256 * 1024 * 1024
    shard_size: int = 2 * 1024 * 1024 * 1024
    engine: str = "native"           # "native" (C++) or "reference" (numpy)
    fail_fast: bool = False
    modality: str = "unknown"
    is_diffusion_model: bool = False

    def __post_init__(self) -> None:
        self.max_memory = parse_size(self.max_memory, "max memory")
        self.chunk_size = parse_size(self.chunk_size, "chunk size")
        self.shard_size = parse_size(self.shard_size, "shard size")
        if self.engine not in ("native", "reference"):
            raise ConfigurationError(f"engine must be 'native' or 'reference', got {self.engine!r}")


# ---------------------------------------------------------------- chunk layout


@dataclass(frozen=True)
class Chunk:
    """A V2 row: rows [row_start, row_start + row_count) of one tensor."""

    index: int
    row_start: int
    row_count: int


def output_row_bytes(t: TensorInfo, plan: TensorPlan) -> int:
    """Bytes one row of the tensor takes in the output (codes + parameters)."""
    if plan.bits is None:
        return t.cols * itemsize(t.dtype)
    # One row on its own: a superblock row's code bytes rounded up (an upper bound).
    return stored_bytes(1, t.cols, plan.bits, plan.group_size, plan.param_dtype)


def _buffer_row_bytes(t: TensorInfo, plan: TensorPlan) -> int:
    """Bytes one row takes in a chunk's output buffers: what it stores, except
    that a superblock row also holds its expanded per-group parameters, its
    units as float32 and each group's two codes unpacked."""
    if plan.bits is None or plan.param_dtype != "superblock":
        return output_row_bytes(t, plan)
    G = groups_per_row(t.cols, plan.group_size)
    S = superblocks_per_row(t.cols, plan.group_size)
    return output_row_bytes(t, plan) + 8 * G + 4 * S + 2 * G


def chunk_buffer_bytes(t: TensorInfo, plan: TensorPlan, rows: int) -> int:
    """Bytes the output buffers of `rows` rows of the tensor take."""
    return max(1, rows) * _buffer_row_bytes(t, plan)


def chunk_rows(t: TensorInfo, plan: TensorPlan, opts: PipelineOptions) -> int:
    """Rows per V2 chunk: at most chunk_size of source bytes, and small enough
    that the pipeline's buffers (three output chunks in flight, the Parquet
    writer's copies of one, and the read buffers) stay inside max_memory.
    Raises MemoryBudgetError when even one row does not fit."""
    src_row = max(1, t.cols * itemsize(t.dtype))
    out_row = max(1, _buffer_row_bytes(t, plan))
    # Widest plan the tensor may end up with (fallback to more bits).
    for b in plan.fallback_bits:
        out_row = max(out_row, _buffer_row_bytes(t, dataclasses.replace(plan, bits=b)))
    read_rows = max(1, read_unit(opts.max_memory) // src_row)
    read_bytes = UNITS_IN_FLIGHT * min(read_rows, t.rows) * src_row
    per_chunk = CHUNKS_IN_FLIGHT + WRITER_COPIES
    need_one_row = UNITS_IN_FLIGHT * src_row + per_chunk * out_row
    if opts.max_memory < need_one_row:
        raise MemoryBudgetError(
            f"tensor {t.name!r}: --max-memory {format_size(opts.max_memory)} cannot hold one row "
            f"of it in the pipeline (needs at least {format_size(need_one_row)}); raise --max-memory"
        )
    budget = sizing_budget(opts.max_memory)
    by_memory = max(1, (budget - min(read_bytes, budget // 2)) // (per_chunk * out_row))
    by_chunk = max(1, opts.chunk_size // src_row)
    return int(max(1, min(t.rows, by_memory, by_chunk)))


def plan_chunks(t: TensorInfo, rows_per_chunk: int) -> List[Chunk]:
    rows = t.rows
    out = []
    for i, start in enumerate(range(0, max(rows, 1), rows_per_chunk)):
        out.append(Chunk(i, start, min(rows_per_chunk, rows - start) if rows else 0))
    return out


def check_memory_budget(tensors: Sequence[TensorInfo], plans: Dict[str, TensorPlan],
                        opts: PipelineOptions) -> None:
    """Up front, before anything is written: every tensor's smallest chunk
    must fit in max_memory (raises MemoryBudgetError naming the tensor)."""
    for t in tensors:
        chunk_rows(t, plans[t.name], opts)


@dataclass
class TensorLayout:
    chunks: List[Chunk]
    done: Dict[int, Dict[str, Any]]     # chunk index -> info of a part staged earlier
    unit_rows: Dict[int, int]           # chunk index -> rows per read
    pooled: bool                        # units read into the run's read pool


def chunk_reads(ti: int, t: TensorInfo, c: Chunk, unit_rows: int, pooled: bool = False,
                ) -> List[Tuple[int, int, str, int, int, int, bool]]:
    """The reads of a chunk, as the Prefetcher takes them: (tensor index,
    chunk index, name, first row, rows, bytes, pooled)."""
    out = []
    for r in range(0, max(c.row_count, 1), unit_rows):
        n = min(unit_rows, c.row_count - r)
        out.append((ti, c.index, t.name, c.row_start + r, n, n * t.cols * itemsize(t.dtype),
                    pooled))
    return out


def read_ahead_budget(opts: PipelineOptions) -> int:
    """Read buffers the Prefetcher may hold: one unit ahead is enough to keep
    the engine busy; more only costs memory."""
    return min(read_unit(opts.max_memory), opts.max_memory // 4)
