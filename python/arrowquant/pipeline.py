"""The streaming quantization pipeline: source -> quantize -> ArrowQuant
Parquet V2, tensor by tensor and chunk by chunk, in bounded memory.

Three stages overlap: a reader thread fills read buffers (pread for
SafeTensors, one row group for Parquet V1), the calling thread quantizes them
with the engine (which releases the GIL and uses every core), and a writer
thread writes each finished chunk as its own small Parquet "part" in a staging
folder inside the output directory. Parts make the run resumable chunk by
chunk; when all exist they are assembled, in order, into the final shard
files, and `metadata.json` is written last: a directory without it is never a
finished model.
"""

from __future__ import annotations

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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
from .plan import Planner, RulePlanner, TensorInfo, TensorPlan
from .sources import ModelSource, itemsize
from .tensor import ErrorSums, groups_per_row, packed_row_bytes
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
    param_bytes = 2 if plan.param_dtype == "float16" else 4
    return packed_row_bytes(t.cols, plan.bits) + 2 * groups_per_row(t.cols, plan.group_size) * param_bytes


def chunk_rows(t: TensorInfo, plan: TensorPlan, opts: PipelineOptions) -> int:
    """Rows per V2 chunk: at most chunk_size of source bytes, and small enough
    that the pipeline's buffers (three output chunks in flight plus the read
    buffers) stay inside max_memory. Raises MemoryBudgetError when even one
    row does not fit."""
    src_row = max(1, t.cols * itemsize(t.dtype))
    out_row = max(1, output_row_bytes(t, plan))
    # Widest plan the tensor may end up with (fallback to more bits).
    for b in plan.fallback_bits:
        out_row = max(out_row, output_row_bytes(t, dataclasses.replace(plan, bits=b)))
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
                      packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> ErrorSums:
        cols = t.cols
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


def part_name(tensor_index: int, chunk_index: int) -> str:
    return f"{tensor_index:06d}-{chunk_index:06d}.parquet"


def read_part_info(path: Path) -> Optional[Dict[str, Any]]:
    """The chunk record stored in a finished part, or None if it is unreadable."""
    try:
        md = pq.read_metadata(str(path)).metadata or {}
        return json.loads(md[b"arrowquant.part"])
    except Exception:  # a part cut short by a crash: redo it
        return None


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
        self._write_q: "queue.Queue[Optional[Tuple[Path, parquet_v2.ChunkRecord, dict]]]" = \
            queue.Queue(maxsize=1)
        self._writer_error: Optional[BaseException] = None
        self._done_bytes = 0
        self._total_bytes = max(1, source.total_bytes)

    # -- writer thread ---------------------------------------------------
    def _writer_loop(self) -> None:
        while True:
            item = self._write_q.get()
            if item is None:
                return
            if self._writer_error is not None:
                continue  # drain
            path, rec, info = item
            try:
                self._write_part(path, rec, info)
            except BaseException as exc:  # reported by the main thread
                self._writer_error = exc

    def _write_part(self, path: Path, rec: parquet_v2.ChunkRecord, info: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        batch = parquet_v2.record_batch(rec)
        try:
            writer = parquet_v2.open_writer(tmp, rec.param_dtype,
                                            {b"arrowquant.part": json.dumps(info).encode()})
            writer.write_batch(batch, row_group_size=1)
            writer.close()
            # Renamed only when complete, so a killed run never leaves a part
            # that looks finished. No fsync: a process kill keeps the page
            # cache; parts unreadable after a power loss are redone on resume.
            os.replace(tmp, path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise _io_error(exc, f"writing {path}") from None

    def _put(self, item: Tuple[Path, parquet_v2.ChunkRecord, dict]) -> None:
        while True:
            if self._writer_error is not None:
                raise self._writer_error
            try:
                self._write_q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- reading ---------------------------------------------------------
    def _read_units(self, t: TensorInfo, chunk: Chunk, unit_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        """(row offset within the chunk, raw bytes) for consecutive row ranges,
        read ahead by a thread so reading overlaps quantizing."""
        ranges = [(r, min(unit_rows, chunk.row_count - r)) for r in range(0, chunk.row_count, unit_rows)]
        if len(ranges) <= 1:
            for r, n in ranges:
                yield r, self.source.read(t.name, chunk.row_start + r, n)
            return
        q: "queue.Queue[Any]" = queue.Queue(maxsize=2)
        stop = threading.Event()

        def reader() -> None:
            try:
                for r, n in ranges:
                    if stop.is_set():
                        return
                    buf = np.empty(n * t.cols * itemsize(t.dtype), dtype=np.uint8)
                    self.source.read(t.name, chunk.row_start + r, n, out=buf)
                    q.put((r, buf))
                q.put(None)
            except BaseException as exc:
                q.put(exc)

        th = threading.Thread(target=reader, name="arrowquant-reader", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while th.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            th.join()

    # -- one chunk --------------------------------------------------------
    def _quantize_chunk(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk,
                        retained: Optional[np.ndarray] = None,
                        keep_source: bool = False) -> Tuple[parquet_v2.ChunkRecord, ErrorSums, Optional[np.ndarray]]:
        rows, cols = chunk.row_count, t.cols
        src_row = cols * itemsize(t.dtype)
        if plan.bits is None:
            data = retained if retained is not None else self.source.read(t.name, chunk.row_start, rows)
            data = np.array(data, dtype=np.uint8, copy=True)  # own it: the reader may reuse buffers
            rec = self._record(t, plan, chunk, data, None, None)
            return rec, ErrorSums(), None
        G = groups_per_row(cols, plan.group_size)
        row_bytes = packed_row_bytes(cols, plan.bits)
        packed = np.empty(rows * row_bytes, dtype=np.uint8)
        scales = np.empty(rows * G, dtype=np.float32)
        zeros = np.empty(rows * G, dtype=np.float32)
        sums = ErrorSums()
        # The numpy reference works a whole chunk at a time (as numpy code
        # does); the engine streams small units. Weighted plans see the chunk.
        whole = self.opts.engine == "reference" or plan.importance is not None \
            or plan.equalization is not None or keep_source or retained is not None
        unit_rows = rows if whole else max(1, READ_UNIT // max(1, src_row))
        kept: Optional[np.ndarray] = None
        units = [(0, retained)] if retained is not None else self._read_units(t, chunk, unit_rows)
        for r, raw in units:
            n = raw.size // max(1, src_row)
            s = self.quantizer.quantize_rows(
                raw, t, plan, n, packed[r * row_bytes:(r + n) * row_bytes],
                scales[r * G:(r + n) * G], zeros[r * G:(r + n) * G])
            sums.merge(s)
            if keep_source:
                kept = raw
        rec = self._record(t, plan, chunk, packed, scales, zeros)
        return rec, sums, kept

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

    def _probe_bits(self, t: TensorInfo, plan: TensorPlan, chunks: List[Chunk],
                    decisions: List[str]) -> TensorPlan:
        """For a tensor of several chunks with a quality floor: measure each
        width over the whole tensor (codes discarded) before writing any."""
        while True:
            sums = ErrorSums()
            for c in chunks:
                self._check_cancel()
                _, s, _ = self._quantize_chunk(t, plan, c)
                sums.merge(s)
            wider = self._next_width(t, plan, sums, decisions)
            if wider is None:
                return plan
            plan = wider

    def run_tensor(self, ti: int, t: TensorInfo, plan: TensorPlan) -> TensorRecord:
        start = time.perf_counter()
        rows_per_chunk = chunk_rows(t, plan, self.opts)
        chunks = plan_chunks(t, rows_per_chunk)
        decisions: List[str] = []
        # Resume: parts already written for this tensor.
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
        has_floor = plan.floor() is not None
        if done:
            # The width was decided before the interruption.
            plan = dataclasses.replace(plan, bits=next(iter(done.values()))["bits"])
            decisions = list(next(iter(done.values())).get("decisions", []))
        elif has_floor and len(chunks) > 1 and (plan.fallback_bits or self.opts.fail_fast):
            plan = self._probe_bits(t, plan, chunks, decisions)
        planned_bits = plan.bits
        markov: Optional[MarkovMetrics] = None

        sums = ErrorSums()
        out_bytes = 0
        for info in done.values():
            sums.merge(ErrorSums(*info["sums"]))
            out_bytes += info["output_bytes"]
            if info.get("markov"):
                markov = _merge_markov(markov, MarkovMetrics(**info["markov"]))
            self._advance(ti, t, info["row_count"])
        for c in chunks:
            if c.index in done:
                continue
            self._check_cancel()
            if has_floor and len(chunks) == 1:
                # Redo from the bytes already read rather than reading again.
                rec, s, raw = self._quantize_chunk(t, plan, c, keep_source=True)
                while (wider := self._next_width(t, plan, s, decisions)) is not None:
                    plan = wider
                    rec, s, _ = self._quantize_chunk(t, plan, c, retained=raw)
            else:
                rec, s, _ = self._quantize_chunk(t, plan, c)
            sums.merge(s)
            chunk_markov = None
            if rec.scales is not None and rec.scales.size:
                chunk_markov = get_markov_metrics(
                    (rec.scales, rec.zero_points),
                    groups_per_row=groups_per_row(t.cols, plan.group_size), bits=plan.bits)
                markov = _merge_markov(markov, chunk_markov)
            nbytes = int(rec.data.nbytes + (0 if rec.scales is None else
                                            (rec.scales.size + rec.zero_points.size) *
                                            (2 if rec.param_dtype == "float16" else 4)))
            out_bytes += nbytes
            info = {"tensor": t.name, "tensor_index": ti, "chunk": c.index,
                    "row_start": c.row_start, "row_count": c.row_count, "bits": plan.bits,
                    "sums": list(sums_tuple(s)), "output_bytes": nbytes, "decisions": decisions,
                    "markov": dataclasses.asdict(chunk_markov) if chunk_markov else None}
            self._put((self.staging / part_name(ti, c.index), rec, info))
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
        self.staging.mkdir(parents=True, exist_ok=True)
        writer = threading.Thread(target=self._writer_loop, name="arrowquant-writer", daemon=True)
        writer.start()
        records: List[TensorRecord] = []
        try:
            for ti, t in enumerate(self.source.tensors):
                records.append(self.run_tensor(ti, t, self.plans[t.name]))
        finally:
            self._write_q.put(None)
            writer.join()
        if self._writer_error is not None:
            raise self._writer_error
        return records

    def assemble(self, records: Sequence[TensorRecord]) -> List[str]:
        """Joins the parts, in order, into model.parquet or numbered shards. A
        tensor never spans two shards (the index maps each tensor to one file),
        so a shard may exceed shard_size by at most one tensor."""
        per_tensor: List[List[Path]] = []
        for ti, (t, rec) in enumerate(zip(self.source.tensors, records)):
            parts = []
            for ci in range(rec.chunks):
                p = self.staging / part_name(ti, ci)
                if not p.exists():
                    raise ArrowQuantError(f"missing staged chunk {p.name} of tensor {t.name!r}")
                parts.append(p)
            per_tensor.append(parts)
        shards: List[List[Path]] = [[]]
        size = 0
        for parts in per_tensor:
            n = sum(p.stat().st_size for p in parts)
            if shards[-1] and size + n > self.opts.shard_size:
                shards.append([])
                size = 0
            shards[-1].extend(parts)
            size += n
        names = ["model.parquet"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
        weight_map: Dict[str, str] = {}
        param_dtype = "float16" if any(r.param_dtype == "float16" for r in records) else "float32"
        for name, group in zip(names, shards):
            tmp = self.out_dir / (name + ".tmp")
            try:
                w = parquet_v2.open_writer(tmp, param_dtype)
                for p in group:
                    table = pq.read_table(str(p), memory_map=True)
                    table = table.cast(parquet_v2.schema(param_dtype))
                    for batch in table.to_batches():
                        parquet_v2.write_row(w, batch)
                        weight_map.setdefault(batch.column(0)[0].as_py(), name)
                    del table
                w.close()
            except OSError as exc:
                raise _io_error(exc, f"writing {tmp}") from None
        for name in names:
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        if len(names) > 1:
            total = sum((self.out_dir / n).stat().st_size for n in names)
            _atomic_write_text(self.out_dir / parquet_v2.INDEX_NAME, json.dumps(
                {"metadata": {"format": parquet_v2.FORMAT_NAME, "total_size": total},
                 "weight_map": weight_map}, indent=2))
        return names


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
