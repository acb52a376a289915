"""The streaming quantization pipeline: source -> quantize -> ArrowQuant
Parquet V2, tensor by tensor and chunk by chunk, in bounded memory.

Three stages overlap: a prefetch thread reads every unit the quantizer will
need, in order (pread for SafeTensors, one row group for Parquet V1), the
calling thread quantizes them with the engine (which releases the GIL and uses
every core), and a writer thread stages each finished chunk as a small "part"
file (what makes the run resumable chunk by chunk) and appends it to the
output Parquet file. `metadata.json` is written last: a directory without it
is never a finished model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq

from . import parquet_v2
from .errors import (
    ArrowQuantError,
    ArrowQuantIOError,
    CancelledError,
    ConfigurationError,
    MemoryBudgetError,
    QuantizationError,
    ValidationError,
)
from .metrics import MarkovMetrics, get_markov_metrics
from .plan import Planner, RulePlanner, TensorInfo, TensorPlan, stored_bytes
from .sources import ModelSource, itemsize
from .tensor import (ErrorSums, check_spec, groups_per_row, packed_row_bytes,
                     superblock_code_bits, superblock_groups, superblocks_per_row)
from .units import format_size, parse_size

STAGING = ".arrowquant-staging"
LOCK_NAME = ".arrowquant.lock"
READ_UNIT = 16 * 1024 * 1024  # bytes of source per engine call in the native pipeline

ProgressFn = Callable[[str, float], None]


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


@dataclass
class TensorRecord:
    """What happened to one tensor: the report entry."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    quant_type: str
    bits: Optional[int]
    reason: str
    group_size: Optional[int]
    scheme: Optional[str]
    method: Optional[str]
    param_dtype: Optional[str]
    chunks: int
    input_bytes: int
    output_bytes: int
    seconds: float
    cosine: Optional[float] = None
    rel_mse: Optional[float] = None
    sqnr_db: Optional[float] = None
    max_abs_error: Optional[float] = None
    decisions: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["num_params"] = self.num_params
        d["bits_per_weight"] = 8.0 * self.output_bytes / self.num_params if self.num_params else 0.0
        for k in ("sqnr_db", "rel_mse"):  # JSON has no Infinity
            if d[k] is not None and not np.isfinite(d[k]):
                d[k] = None if np.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
        return d


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
    that a superblock row also holds its expanded per-group parameters and
    its units as float32 until the codes are packed."""
    if plan.bits is None or plan.param_dtype != "superblock":
        return output_row_bytes(t, plan)
    G = groups_per_row(t.cols, plan.group_size)
    S = superblocks_per_row(t.cols, plan.group_size)
    return output_row_bytes(t, plan) + 8 * G + 4 * S


def chunk_rows(t: TensorInfo, plan: TensorPlan, opts: PipelineOptions) -> int:
    """Rows per V2 chunk: at most chunk_size of source bytes, and small enough
    that the pipeline's buffers (three output chunks in flight plus the read
    buffers) stay inside max_memory. Raises MemoryBudgetError when even one
    row does not fit."""
    src_row = max(1, t.cols * itemsize(t.dtype))
    out_row = max(1, _buffer_row_bytes(t, plan))
    # Widest plan the tensor may end up with (fallback to more bits).
    for b in plan.fallback_bits:
        out_row = max(out_row, _buffer_row_bytes(t, dataclasses.replace(plan, bits=b)))
    read_rows = max(1, READ_UNIT // src_row)
    read_bytes = 3 * min(read_rows, t.rows) * src_row  # queued + being read + being quantized
    need_one_row = 3 * src_row + 3 * out_row
    if opts.max_memory < need_one_row:
        raise MemoryBudgetError(
            f"tensor {t.name!r}: --max-memory {format_size(opts.max_memory)} cannot hold one row "
            f"of it in the pipeline (needs at least {format_size(need_one_row)}); raise --max-memory"
        )
    by_memory = max(1, (opts.max_memory - min(read_bytes, opts.max_memory // 2)) // (3 * out_row))
    by_chunk = max(1, opts.chunk_size // src_row)
    return int(max(1, min(t.rows, by_memory, by_chunk)))


def plan_chunks(t: TensorInfo, rows_per_chunk: int) -> List[Chunk]:
    rows = t.rows
    out = []
    for i, start in enumerate(range(0, max(rows, 1), rows_per_chunk)):
        out.append(Chunk(i, start, min(rows_per_chunk, rows - start) if rows else 0))
    return out


# ---------------------------------------------------------------- backends


class ChunkQuantizer:
    """Quantizes row ranges into a chunk's output buffers with the chosen
    engine. Plans with importance or equalization go to arrowquant.importance."""

    def __init__(self, engine: str, threads: int):
        self.engine = engine
        self.threads = threads

    def quantize_rows(self, raw: np.ndarray, t: TensorInfo, plan: TensorPlan, rows: int,
                      packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                      sb_scales: Optional[np.ndarray] = None,
                      sb_zeros: Optional[np.ndarray] = None) -> ErrorSums:
        """Codes and per-group parameters of `rows` rows into the buffers; a
        "superblock" plan also fills its super-block units (sb_scales / sb_zeros)."""
        cols = t.cols
        if plan.param_dtype == "superblock":
            return self._superblock_rows(raw, t, plan, rows, packed, scales, zeros, sb_scales,
                                         sb_zeros)
        if plan.importance is not None or plan.equalization is not None:
            from .importance import quantize_weighted

            qt, _info = quantize_weighted(
                raw, dtype=t.dtype, shape=(rows, cols), bits=plan.bits,
                group_size=plan.group_size, scheme=plan.scheme, importance=plan.importance,
                equalization=plan.equalization, name=t.name, threads=self.threads,
            )
            return self._copy_out(qt, packed, scales, zeros)
        if self.engine == "reference":
            from . import reference

            qt = reference.quantize_array(
                raw, dtype=t.dtype, shape=(rows, cols), bits=plan.bits, group_size=plan.group_size,
                scheme=plan.scheme, method=plan.method, param_dtype=plan.param_dtype, name=t.name,
            )
            return self._copy_out(qt, packed, scales, zeros)
        from . import _core
        from .engine import _call

        sums = _call(t.name, _core.quantize, raw, t.dtype, rows, cols, plan.bits, plan.group_size,
                     plan.scheme, plan.method, plan.param_dtype, packed, scales, zeros,
                     self.threads, False)
        return ErrorSums(*sums)

    def _superblock_rows(self, raw: np.ndarray, t: TensorInfo, plan: TensorPlan, rows: int,
                         packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                         sb_scales: Optional[np.ndarray],
                         sb_zeros: Optional[np.ndarray]) -> ErrorSums:
        """Two-level parameters: the engine writes the units beside the
        expanded per-group parameters (the reference returns them with its
        tensor). Super-blocks never span rows, so row ranges quantize
        independently."""
        if plan.importance is not None or plan.equalization is not None:
            raise ConfigurationError(
                f"tensor {t.name!r}: importance-weighted (calibrated) quantization does not "
                "support param dtype 'superblock'; use float16 or float32 parameters")
        if sb_scales is None or sb_zeros is None:
            raise ValueError("a superblock plan needs buffers for its units")
        check_spec(plan.bits, plan.group_size, plan.scheme, plan.method, "superblock")
        if self.engine == "reference":
            from . import reference

            qt = reference.quantize_array(
                raw, dtype=t.dtype, shape=(rows, t.cols), bits=plan.bits,
                group_size=plan.group_size, scheme=plan.scheme, method=plan.method,
                param_dtype="superblock", name=t.name)
            sb_scales[...] = qt.superblock_scales
            sb_zeros[...] = qt.superblock_zero_points
            return self._copy_out(qt, packed, scales, zeros)
        from . import _core
        from .engine import _call

        sums = _call(t.name, _core.quantize_superblock, raw, t.dtype, rows, t.cols, plan.bits,
                     plan.group_size, plan.method, packed, scales, zeros, sb_scales, sb_zeros,
                     self.threads, False)
        return ErrorSums(*sums)

    @staticmethod
    def _copy_out(qt: Any, packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> ErrorSums:
        packed[...] = qt.data
        scales[...] = qt.scales
        zeros[...] = qt.zero_points
        return qt.error if qt.error is not None else ErrorSums()


# ---------------------------------------------------------------- staging & lock


class OutputLock:
    """An exclusive flock on OUTPUT/.arrowquant.lock. The kernel drops it when
    the process dies, so a crashed run never leaves it stuck."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArrowQuantError(
                f"{self.path.parent}: another arrowquant run (pid {holder}) is writing this output "
                "directory; wait for it or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _io_error(exc: OSError, what: str) -> ArrowQuantIOError:
    return ArrowQuantIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno}); the staging "
                             "folder is kept, so `--resume` can finish the run after the cause is "
                             "fixed")


PART_MAGIC = b"AQPART1\0"  # superblock chunks add "code_bytes" (FORMAT.md section 9)
_RECORD_FIELDS = ("layer_name", "row_start", "row_count", "dtype", "num_params", "quant_type",
                  "scheme", "method", "group_size", "param_dtype", "is_diffusion_model",
                  "modality", "time_aware_quant_json", "spatial_quant_json",
                  "activation_stats_json")


def part_name(tensor_index: int, chunk_index: int) -> str:
    return f"{tensor_index:06d}-{chunk_index:06d}.part"


def write_part(path: Path, rec: parquet_v2.ChunkRecord, info: Dict[str, Any]) -> None:
    """A finished chunk as a staging file: magic, header length, JSON header,
    then the packed data, scales and zero points (float32). Written to *.tmp
    and renamed, so a killed run never leaves a part that looks complete."""
    scales = np.zeros(0, np.float32) if rec.scales is None else np.asarray(rec.scales, np.float32)
    zeros = np.zeros(0, np.float32) if rec.zero_points is None else np.asarray(rec.zero_points, np.float32)
    record = {k: getattr(rec, k) for k in _RECORD_FIELDS}
    record["shape"] = list(rec.shape)
    record["data_bytes"] = int(rec.data.nbytes)
    record["params"] = int(scales.size)
    codes = np.zeros(0, np.uint8)
    if rec.param_codes is not None:
        codes = np.ascontiguousarray(rec.param_codes, dtype=np.uint8)
        record["code_bytes"] = int(codes.size)
        record["param_code_bits"] = rec.param_code_bits
        record["superblock_groups"] = rec.superblock_groups
    header = json.dumps({"info": info, "record": record}).encode()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(PART_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(memoryview(np.ascontiguousarray(rec.data, dtype=np.uint8)))
            f.write(memoryview(scales))
            f.write(memoryview(zeros))
            f.write(memoryview(codes))
        # No fsync: a killed process keeps the page cache; a part unreadable
        # after a power loss fails its size check and is redone on resume.
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _io_error(exc, f"writing {path}") from None


def _part_header(f: Any, size: int) -> Optional[Tuple[Dict[str, Any], int]]:
    head = f.read(16)
    if len(head) < 16 or head[:8] != PART_MAGIC:
        return None
    n = int.from_bytes(head[8:], "little")
    if n > size - 16:
        return None
    try:
        header = json.loads(f.read(n))
    except ValueError:
        return None
    rec = header.get("record", {})
    if size != 16 + n + rec.get("data_bytes", -1) + 8 * rec.get("params", -1) + \
            rec.get("code_bytes", 0):
        return None  # cut short
    return header, 16 + n


def read_part_info(path: Path) -> Optional[Dict[str, Any]]:
    """The info of a complete part, or None when it is missing or damaged."""
    try:
        with open(path, "rb") as f:
            found = _part_header(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return None
    return None if found is None else found[0]["info"]


def read_part(path: Path) -> parquet_v2.ChunkRecord:
    """The chunk stored in a part (data read into memory)."""
    with open(path, "rb") as f:
        found = _part_header(f, os.fstat(f.fileno()).st_size)
        if found is None:
            raise ArrowQuantError(f"{path}: damaged staging part; rerun with --resume")
        header, _ = found
        r = header["record"]
        data = np.frombuffer(f.read(r["data_bytes"]), dtype=np.uint8)
        scales = np.frombuffer(f.read(4 * r["params"]), dtype=np.float32)
        zeros = np.frombuffer(f.read(4 * r["params"]), dtype=np.float32)
        codes = np.frombuffer(f.read(r["code_bytes"]), dtype=np.uint8) if "code_bytes" in r \
            else None
    quantized = r["quant_type"] != "none"
    return parquet_v2.ChunkRecord(
        shape=tuple(r["shape"]), data=data, scales=scales if quantized else None,
        zero_points=zeros if quantized else None, param_codes=codes,
        param_code_bits=r.get("param_code_bits"), superblock_groups=r.get("superblock_groups"),
        **{k: r[k] for k in _RECORD_FIELDS})


class ShardWriter:
    """Appends chunk rows, in order, to model.parquet or numbered shards. A
    tensor never spans two files (the index maps each tensor to one), so a new
    file starts only between tensors, decided from the tensor's planned output
    bytes: the same boundaries whether a run was interrupted or not."""

    def __init__(self, out_dir: Path, shard_size: int, param_dtype: str,
                 superblock: bool = False):
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.param_dtype = param_dtype   # list value type of every file (float16 / float32)
        self.superblock = superblock     # every file has the superblock columns
        self.files: List[Path] = []      # temporary names, in order
        self.weight_map: Dict[str, int] = {}
        self._writer: Optional[pq.ParquetWriter] = None
        self._size = 0

    def begin_tensor(self, name: str, planned_bytes: int) -> None:
        if self._writer is None or (self._size and self._size + planned_bytes > self.shard_size):
            self._close_current()
            path = self.out_dir / f"model-{len(self.files) + 1:05d}.parquet.tmp"
            try:
                self._writer = parquet_v2.open_writer(path, self.param_dtype,
                                                      superblock=self.superblock)
            except OSError as exc:
                raise _io_error(exc, f"writing {path}") from None
            self.files.append(path)
            self._size = 0
        self.weight_map[name] = len(self.files) - 1
        self._size += planned_bytes

    def write(self, rec: parquet_v2.ChunkRecord) -> None:
        assert self._writer is not None, "begin_tensor first"
        try:
            parquet_v2.write_row(self._writer, parquet_v2.record_batch(rec, self.param_dtype,
                                                                       self.superblock))
        except OSError as exc:
            raise _io_error(exc, f"writing {self.files[-1]}") from None

    def _close_current(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                raise _io_error(exc, f"writing {self.files[-1]}") from None
            self._writer = None

    def abort(self) -> None:
        try:
            self._close_current()
        except ArrowQuantError:
            pass

    def finish(self) -> List[str]:
        """Renames the files to their final names; writes the index when sharded."""
        self._close_current()
        n = len(self.files)
        names = ["model.parquet"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.parquet" for i in range(n)]
        for tmp, name in zip(self.files, names):
            os.replace(tmp, self.out_dir / name)
        if n > 1:
            total = sum((self.out_dir / name).stat().st_size for name in names)
            _atomic_write_text(self.out_dir / parquet_v2.INDEX_NAME, json.dumps(
                {"metadata": {"format": parquet_v2.FORMAT_NAME, "total_size": total},
                 "weight_map": {t: names[i] for t, i in self.weight_map.items()}}, indent=2))
        return names


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    records: List[TensorRecord]
    files: List[str]
    output_bytes: int
    seconds: float


class StreamingQuantizer:
    """Runs the plans of one source into a V2 directory (see module docstring)."""

    def __init__(self, source: ModelSource, plans: Dict[str, TensorPlan], out_dir: Path,
                 opts: PipelineOptions, progress: Optional[ProgressFn] = None,
                 on_tensor: Optional[Callable[[TensorRecord], None]] = None,
                 cancel: Optional[threading.Event] = None):
        self.source = source
        self.plans = plans
        self.out_dir = out_dir
        self.staging = out_dir / STAGING
        self.opts = opts
        self.progress = progress
        self.on_tensor = on_tensor
        self.cancel = cancel
        self.quantizer = ChunkQuantizer(opts.engine, opts.threads)
        self._write_q: "queue.Queue[Optional[WriteItem]]" = queue.Queue(maxsize=1)
        self._writer_error: Optional[BaseException] = None
        self._done_bytes = 0
        self._total_bytes = max(1, source.total_bytes)
        value_type, superblock = parquet_v2.file_layout(
            p.param_dtype for p in plans.values() if p.bits)
        self.shards = ShardWriter(out_dir, opts.shard_size, value_type, superblock)

    # -- writer thread ---------------------------------------------------
    def _writer_loop(self) -> None:
        """Stages each chunk (unless it was staged by an earlier run) and
        appends it to the output files, in order."""
        while True:
            item = self._write_q.get()
            if item is None:
                return
            if self._writer_error is not None:
                continue  # drain
            try:
                path = self.staging / part_name(item.tensor_index, item.chunk_index)
                rec = item.record
                if rec is None:
                    rec = read_part(path)  # resumed: staged by the interrupted run
                else:
                    write_part(path, rec, item.info)
                if item.chunk_index == 0:
                    self.shards.begin_tensor(rec.layer_name, item.tensor_bytes)
                self.shards.write(rec)
            except BaseException as exc:  # reported by the main thread
                self._writer_error = exc

    def _put(self, item: "WriteItem") -> None:
        while True:
            if self._writer_error is not None:
                raise self._writer_error
            try:
                self._write_q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- reading ---------------------------------------------------------
    def _unit_rows(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk, single_floor: bool) -> int:
        """Rows per read of a chunk. The engine streams 16 MiB units; the numpy
        reference works a whole chunk at a time (as numpy code does), and so do
        weighted plans, unquantized ones, and a single chunk that may be redone
        at a wider width from the bytes already read."""
        whole = self.opts.engine == "reference" or plan.bits is None or single_floor \
            or plan.importance is not None or plan.equalization is not None
        if whole:
            return max(1, chunk.row_count)
        return max(1, READ_UNIT // max(1, t.cols * itemsize(t.dtype)))

    def _sync_units(self, t: TensorInfo, chunk: Chunk, unit_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Reads of a chunk in the calling thread (probing widths re-reads)."""
        for r in range(0, max(chunk.row_count, 1), unit_rows):
            n = min(unit_rows, chunk.row_count - r) if chunk.row_count else 0
            yield r, self.source.read(t.name, chunk.row_start + r, n)

    # -- one chunk --------------------------------------------------------
    def _quantize_chunk(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk,
                        units: Iterable[Tuple[int, np.ndarray]],
                        keep_source: bool = False) -> Tuple[parquet_v2.ChunkRecord, ErrorSums, Optional[np.ndarray]]:
        """Quantizes a chunk from its read units (row offset, raw bytes). With
        keep_source, the chunk's bytes (one unit) come back for a redo."""
        rows, cols = chunk.row_count, t.cols
        src_row = cols * itemsize(t.dtype)
        if plan.bits is None:
            parts = [raw for _, raw in units]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            rec = self._record(t, plan, chunk, np.asarray(data, dtype=np.uint8), None, None)
            return rec, ErrorSums(), None
        G = groups_per_row(cols, plan.group_size)
        row_bytes = packed_row_bytes(cols, plan.bits)
        packed = np.empty(rows * row_bytes, dtype=np.uint8)
        scales = np.empty(rows * G, dtype=np.float32)
        zeros = np.empty(rows * G, dtype=np.float32)
        sb = plan.param_dtype == "superblock"
        S = superblocks_per_row(cols, plan.group_size) if sb else 0
        sb_scales = np.empty(rows * S, dtype=np.float32)
        sb_zeros = np.empty(rows * S, dtype=np.float32)
        sums = ErrorSums()
        kept: Optional[np.ndarray] = None
        for r, raw in units:
            n = raw.size // max(1, src_row)
            try:
                s = self.quantizer.quantize_rows(
                    raw, t, plan, n, packed[r * row_bytes:(r + n) * row_bytes],
                    scales[r * G:(r + n) * G], zeros[r * G:(r + n) * G],
                    sb_scales[r * S:(r + n) * S] if sb else None,
                    sb_zeros[r * S:(r + n) * S] if sb else None)
            except ValidationError as exc:
                raise self._located(exc, t, raw, chunk.row_start + r) from None
            sums.merge(s)
            if keep_source:
                kept = raw
        if sb:
            rec = self._record(t, plan, chunk, packed, sb_scales, sb_zeros)
            rec.param_codes = parquet_v2.superblock_params(
                t.name, rows, cols, plan.bits, plan.group_size, scales, zeros, sb_scales, sb_zeros)
            rec.param_code_bits = superblock_code_bits(plan.bits)
            rec.superblock_groups = superblock_groups(plan.group_size)
            rec.group_params = (scales, zeros)
        else:
            rec = self._record(t, plan, chunk, packed, scales, zeros)
        return rec, sums, kept

    def _located(self, exc: ValidationError, t: TensorInfo, raw: np.ndarray,
                 first_row: int) -> ValidationError:
        """The engine sees one read unit, so its NaN/Inf position counts rows
        from the unit's start: restate it for the whole tensor, with the file."""
        from .reference import to_float32

        x = to_float32(np.asarray(raw, dtype=np.uint8), t.dtype)
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size == 0:  # another validation error: its message stands
            return exc
        i = int(bad[0])
        row, col = first_row + i // t.cols, i % t.cols
        kind = "NaN" if np.isnan(x[i]) else "Inf"
        return ValidationError(f"tensor {t.name!r}: {kind} at index {row * t.cols + col} "
                               f"(row {row}, column {col}) in {self.source.location(t.name)}")

    def _record(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk, data: np.ndarray,
                scales: Optional[np.ndarray], zeros: Optional[np.ndarray]) -> parquet_v2.ChunkRecord:
        quantized = plan.bits is not None
        spatial = plan.spatial_json
        if quantized and plan.equalization is not None and spatial is None:
            spatial = json.dumps({"method": "channel_equalization",
                                  "scales": [float(v) for v in np.asarray(plan.equalization)]})
        return parquet_v2.ChunkRecord(
            layer_name=t.name, row_start=chunk.row_start, row_count=chunk.row_count,
            shape=tuple(t.shape), dtype=t.dtype, data=data, num_params=t.numel,
            quant_type=f"int{plan.bits}" if quantized else "none",
            scheme=plan.scheme if quantized else None, method=plan.method if quantized else None,
            group_size=plan.group_size if quantized else None,
            scales=scales, zero_points=zeros,
            param_dtype=plan.param_dtype if quantized else "float32",
            is_diffusion_model=self.opts.is_diffusion_model, modality=self.opts.modality,
            time_aware_quant_json=plan.time_aware_json if quantized else None,
            spatial_quant_json=spatial if quantized else None,
            activation_stats_json=plan.activation_stats_json if quantized else None,
        )

    # -- one tensor -------------------------------------------------------
    def _next_width(self, t: TensorInfo, plan: TensorPlan, sums: ErrorSums,
                    decisions: List[str]) -> Optional[TensorPlan]:
        """The plan to redo the tensor with when it is below its floor, or None
        to keep the result. Under fail_fast a tensor below its floor is an error."""
        floor = plan.floor()
        if floor is None:
            return None
        cos = sums.metrics().cosine
        if cos >= floor:
            return None
        if self.opts.fail_fast:
            raise QuantizationError(
                f"tensor {t.name!r}: cosine {cos:.4f} at INT{plan.bits} is below the floor "
                f"{floor} (fail_fast is on, so no fallback to more bits)")
        wider = [b for b in plan.fallback_bits if b > plan.bits]
        if not wider:
            decisions.append(f"int{plan.bits}: cosine {cos:.4f} < {floor}; no wider width left, "
                             "kept")
            return None
        decisions.append(f"int{plan.bits}: cosine {cos:.4f} < {floor}; redone at int{wider[0]}")
        return dataclasses.replace(plan, bits=wider[0])

    def _probe_bits(self, t: TensorInfo, plan: TensorPlan, layout: "TensorLayout",
                    decisions: List[str]) -> TensorPlan:
        """For a tensor of several chunks with a quality floor: measure each
        width over the whole tensor (codes discarded) before writing any."""
        while True:
            sums = ErrorSums()
            for c in layout.chunks:
                self._check_cancel()
                units = self._sync_units(t, c, layout.unit_rows[c.index])
                _, s, _ = self._quantize_chunk(t, plan, c, units)
                sums.merge(s)
            wider = self._next_width(t, plan, sums, decisions)
            if wider is None:
                return plan
            plan = wider

    def layout(self, ti: int, t: TensorInfo, plan: TensorPlan) -> "TensorLayout":
        """Chunks and read units of a tensor, and the chunks an interrupted run
        already staged (a damaged part is removed and redone)."""
        chunks = plan_chunks(t, chunk_rows(t, plan, self.opts))
        done: Dict[int, Dict[str, Any]] = {}
        for c in chunks:
            p = self.staging / part_name(ti, c.index)
            if p.exists():
                info = read_part_info(p)
                if info is not None and info.get("row_start") == c.row_start \
                        and info.get("row_count") == c.row_count:
                    done[c.index] = info
                else:
                    p.unlink()
        single_floor = plan.floor() is not None and len(chunks) == 1
        unit_rows = {c.index: self._unit_rows(t, plan, c, single_floor) for c in chunks}
        return TensorLayout(chunks, done, unit_rows)

    def run_tensor(self, ti: int, t: TensorInfo, plan: TensorPlan,
                   layout: "TensorLayout", prefetch: "Prefetcher") -> TensorRecord:
        start = time.perf_counter()
        chunks, done = layout.chunks, layout.done
        decisions: List[str] = []
        has_floor = plan.floor() is not None
        if done:
            # The width was decided before the interruption.
            plan = dataclasses.replace(plan, bits=next(iter(done.values()))["bits"])
            decisions = list(next(iter(done.values())).get("decisions", []))
        elif has_floor and len(chunks) > 1 and (plan.fallback_bits or self.opts.fail_fast):
            plan = self._probe_bits(t, plan, layout, decisions)
        planned_bits = plan.bits
        markov: Optional[MarkovMetrics] = None

        sums = ErrorSums()
        out_bytes = 0
        tensor_bytes = max(1, t.rows) * output_row_bytes(t, plan)
        for c in chunks:
            self._check_cancel()
            if c.index in done:
                info = done[c.index]
                sums.merge(ErrorSums(*info["sums"]))
                out_bytes += info["output_bytes"]
                if info.get("markov"):
                    markov = _merge_markov(markov, MarkovMetrics(**info["markov"]))
                self._put(WriteItem(ti, c.index, None, info, tensor_bytes))
                self._advance(ti, t, c.row_count)
                continue
            units = prefetch.units(ti, c.index)
            if has_floor and len(chunks) == 1:
                # Redo from the bytes already read rather than reading again.
                rec, s, raw = self._quantize_chunk(t, plan, c, units, keep_source=True)
                while (wider := self._next_width(t, plan, s, decisions)) is not None:
                    plan = wider
                    rec, s, _ = self._quantize_chunk(t, plan, c, [(0, raw)])
            else:
                rec, s, _ = self._quantize_chunk(t, plan, c, units)
            sums.merge(s)
            chunk_markov = None
            group_params = rec.group_params or (rec.scales, rec.zero_points)
            if group_params[0] is not None and group_params[0].size:
                chunk_markov = get_markov_metrics(
                    group_params, groups_per_row=groups_per_row(t.cols, plan.group_size),
                    bits=plan.bits)
                markov = _merge_markov(markov, chunk_markov)
            nbytes = rec.stored_bytes
            out_bytes += nbytes
            info = {"tensor": t.name, "tensor_index": ti, "chunk": c.index,
                    "row_start": c.row_start, "row_count": c.row_count, "bits": plan.bits,
                    "sums": list(sums_tuple(s)), "output_bytes": nbytes, "decisions": decisions,
                    "markov": dataclasses.asdict(chunk_markov) if chunk_markov else None}
            self._put(WriteItem(ti, c.index, rec, info, tensor_bytes))
            self._advance(ti, t, c.row_count)
        if has_floor and len(chunks) > 1 and not done and plan.bits == planned_bits:
            self._next_width(t, dataclasses.replace(plan, fallback_bits=()), sums, decisions)
        seconds = time.perf_counter() - start
        m = sums.metrics() if plan.bits is not None else None
        reason = plan.reason
        if plan.bits != planned_bits or any("redone" in d for d in decisions):
            reason = f"{reason}; fallback to int{plan.bits} (cosine floor)"
        extra = dict(plan.extra)
        if markov is not None:
            extra["markov"] = markov.as_dict()
        record = TensorRecord(
            name=t.name, shape=tuple(t.shape), dtype=t.dtype,
            quant_type=f"int{plan.bits}" if plan.bits else "none", bits=plan.bits, reason=reason,
            group_size=plan.group_size if plan.bits else None,
            scheme=plan.scheme if plan.bits else None, method=plan.method if plan.bits else None,
            param_dtype=plan.param_dtype if plan.bits else None, chunks=len(chunks),
            input_bytes=t.nbytes, output_bytes=out_bytes, seconds=seconds,
            cosine=m.cosine if m else None, rel_mse=m.rel_mse if m else None,
            sqnr_db=m.sqnr_db if m else None, max_abs_error=m.max_abs_error if m else None,
            decisions=decisions, extra=extra,
        )
        if self.on_tensor:
            self.on_tensor(record)
        return record

    def _advance(self, ti: int, t: TensorInfo, rows: int) -> None:
        self._done_bytes += rows * t.cols * itemsize(t.dtype) if t.rows else t.nbytes
        if self.progress:
            message = f"tensor {ti + 1}/{len(self.source.tensors)} {t.name}"
            self.progress(message, min(1.0, self._done_bytes / self._total_bytes))

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("run cancelled; the staging folder is kept for --resume")

    # -- whole run ---------------------------------------------------------
    def run(self) -> List[TensorRecord]:
        """Quantizes every tensor; the output files are complete (under
        temporary names) when it returns. finish() renames them."""
        self.staging.mkdir(parents=True, exist_ok=True)
        writer = threading.Thread(target=self._writer_loop, name="arrowquant-writer", daemon=True)
        writer.start()
        records: List[TensorRecord] = []
        layouts = [self.layout(ti, t, self.plans[t.name]) for ti, t in enumerate(self.source.tensors)]
        reads = [(ti, c.index, t.name, c.row_start + r,
                  min(lay.unit_rows[c.index], c.row_count - r),
                  min(lay.unit_rows[c.index], c.row_count - r) * t.cols * itemsize(t.dtype))
                 for ti, (t, lay) in enumerate(zip(self.source.tensors, layouts))
                 for c in lay.chunks if c.index not in lay.done
                 for r in range(0, max(c.row_count, 1), lay.unit_rows[c.index])]
        # One unit ahead is enough to keep the engine busy; more only costs memory.
        budget = min(READ_UNIT, self.opts.max_memory // 4)
        prefetch = Prefetcher(self.source, reads, budget)
        try:
            for ti, t in enumerate(self.source.tensors):
                records.append(self.run_tensor(ti, t, self.plans[t.name], layouts[ti], prefetch))
        finally:
            prefetch.close()
            self._write_q.put(None)
            writer.join()
            if self._writer_error is not None or len(records) < len(self.source.tensors):
                self.shards.abort()
        if self._writer_error is not None:
            raise self._writer_error
        return records

    def finish(self) -> List[str]:
        """Final names for the output files (and the index when sharded)."""
        return self.shards.finish()


@dataclass
class TensorLayout:
    chunks: List[Chunk]
    done: Dict[int, Dict[str, Any]]     # chunk index -> info of a part staged earlier
    unit_rows: Dict[int, int]           # chunk index -> rows per read


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


@dataclass
class WriteItem:
    """A chunk for the writer thread: its record, or None to replay the part
    an interrupted run staged."""

    tensor_index: int
    chunk_index: int
    record: Optional[parquet_v2.ChunkRecord]
    info: Dict[str, Any]
    tensor_bytes: int


@contextlib.contextmanager
def lean_allocators() -> Iterator[None]:
    """Buffers freed by the pipeline go back to the system instead of staying
    resident in an allocator's cache: glibc's mmap threshold is fixed (the
    engine's fix_mmap_threshold) and Arrow allocates from the system pool
    for the run (the previous pool is restored after). Readers opened inside
    allocate from it too."""
    import pyarrow as pa

    from . import _core

    _core.fix_mmap_threshold()
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _merge_markov(acc: Optional[MarkovMetrics], new: MarkovMetrics) -> MarkovMetrics:
    if acc is None:
        return new
    acc.merge(new)
    return acc


def sums_tuple(s: ErrorSums) -> Tuple[float, ...]:
    return s.as_tuple()


def check_memory_budget(tensors: Sequence[TensorInfo], plans: Dict[str, TensorPlan],
                        opts: PipelineOptions) -> None:
    """Up front, before anything is written: every tensor's smallest chunk
    must fit in max_memory (raises MemoryBudgetError naming the tensor)."""
    for t in tensors:
        chunk_rows(t, plans[t.name], opts)


def default_plans(source: ModelSource, planner: Optional[Planner], **rule_kwargs: Any) -> Dict[str, TensorPlan]:
    planner = planner or RulePlanner(**rule_kwargs)
    plans = planner.plan(source.tensors)
    missing = [t.name for t in source.tensors if t.name not in plans]
    if missing:
        raise ConfigurationError(f"the planner gave no plan for {len(missing)} tensor(s), "
                                 f"e.g. {missing[0]!r}")
    return plans
