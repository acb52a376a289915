"""The streaming quantization pipeline: source -> quantize -> ArrowQuant
Parquet V2, tensor by tensor and chunk by chunk, in bounded memory. Kept
whole as one module: the steps of a tensor (read units, quantize, the
cosine-floor fallbacks, staging) share the run's buffer pools, the writer
queue and the cancel flag; the Ray executor reuses the same steps.

Three stages overlap: a prefetch thread reads every unit the quantizer will
need, in order (pread for SafeTensors, one row group for Parquet V1), the
calling thread quantizes them with the engine (which releases the GIL and uses
every core), and a writer thread stages each finished chunk as a small "part"
file (what makes the run resumable chunk by chunk) and appends it to the
output Parquet file. `metadata.json` is written last: a directory without it
is never a finished model.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..engine import core
from ..engine.chunk import ChunkBuffers, ChunkQuantizer
from ..engine.dtypes import itemsize
from ..engine.metrics import ErrorSums, MarkovMetrics, markov_of_params
from ..engine.finite import with_location
from ..errors import CancelledError, QuantizationError, ValidationError
from ..formats.v2_schema import ChunkRecord, file_layout
from ..formats.v2_writer import ShardWriter
from ..planning.plan import TensorPlan
from ..sources.base import ModelSource, TensorInfo
from ..spec import (groups_per_row, packed_row_bytes, param_code_bytes, superblock_code_bits,
                    superblock_groups, superblocks_per_row)
from .buffers import BufferPool, Leases, arena_bytes, carve
from .layout import (HOLD_CHUNKS, Chunk, PipelineOptions, TensorLayout, chunk_reads, chunk_rows,
                     output_row_bytes, plan_chunks, read_ahead_budget, read_unit)
from .prefetch import Prefetcher
from .report import TensorRecord, merge_markov
from .staging import STAGING, part_name, read_part, read_part_info, write_part

ProgressFn = Callable[[str, float], None]


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
        value_type, superblock = file_layout(
            p.param_dtype for p in plans.values() if p.bits)
        grid = any(p.bits and p.spec.grid for p in plans.values())
        self.shards = ShardWriter(out_dir, opts.shard_size, value_type, superblock, grid)
        self._levels: Dict[str, np.ndarray] = {}  # code grid tables, per tensor
        # Output buffers of the chunks in flight (quantizing, queued, being
        # written), reused from chunk to chunk; the writer gives them back.
        self._out_pool = BufferPool(keep=3)
        # The calling thread's own reads (probing widths, a redo): one buffer.
        self._sync_reads = Leases(BufferPool(keep=1))

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
                if item.arena is not None:
                    self._out_pool.give(item.arena)  # pyarrow and the part hold no view of it
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
    def _streamed(self, plan: TensorPlan) -> bool:
        """Whether the engine streams a chunk in 16 MiB units. The numpy
        reference works a whole chunk at a time (as numpy code does), and so do
        weighted plans and unquantized ones. A single chunk that falls below
        its floor is read again for the redo at a wider width (from the page
        cache) rather than held whole in memory."""
        return not (self.opts.engine == "reference" or plan.bits is None
                    or plan.importance is not None or plan.equalization is not None)

    def _unit_rows(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk) -> int:
        """Rows per read of a chunk (see _streamed)."""
        if not self._streamed(plan):
            return max(1, chunk.row_count)
        return max(1, read_unit(self.opts.max_memory) // max(1, t.cols * itemsize(t.dtype)))

    def _sync_units(self, t: TensorInfo, chunk: Chunk, unit_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Reads of a chunk in the calling thread (probing widths re-reads),
        into a pooled buffer: pass `self._sync_reads.give_back` as recycle."""
        row_bytes = t.cols * itemsize(t.dtype) if t.rows else t.nbytes
        for r in range(0, max(chunk.row_count, 1), unit_rows):
            n = min(unit_rows, chunk.row_count - r) if chunk.row_count else 0
            base = self._sync_reads.pool.take(max(1, n * row_bytes))
            yield r, self._sync_reads.lend(self.source.read(t.name, chunk.row_start + r, n,
                                                            out=base), base)

    # -- one chunk --------------------------------------------------------
    def _quantize_chunk(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk,
                        units: Iterable[Tuple[int, np.ndarray]],
                        keep_source: bool = False,
                        recycle: Optional[Callable[[np.ndarray], None]] = None,
                        ) -> Tuple[ChunkRecord, ErrorSums, Optional[np.ndarray]]:
        """Quantizes a chunk from its read units (row offset, raw bytes). With
        keep_source, the chunk's bytes (one unit) come back for a redo;
        `recycle` gets each unit back once the engine is done with it. The
        record's buffers live in one arena of the output pool
        (`rec.arena`), given back by the writer."""
        rows, cols = chunk.row_count, t.cols
        src_row = cols * itemsize(t.dtype)
        if plan.bits is None:
            parts = [raw for _, raw in units]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            rec = self._record(t, plan, chunk, np.asarray(data, dtype=np.uint8), None, None)
            return rec, ErrorSums(), None
        G = groups_per_row(cols, plan.group_size)
        row_bytes = packed_row_bytes(cols, plan.bits)
        sb = plan.param_dtype == "superblock"
        S = superblocks_per_row(cols, plan.group_size) if sb else 0
        # The engine hands out each group's codes (superblock): what the file stores.
        code_bits = superblock_code_bits(plan.bits) if sb else 0
        parts = [(rows * row_bytes, np.uint8), (rows * G, np.float32), (rows * G, np.float32),
                 (rows * S, np.float32), (rows * S, np.float32),
                 (rows * G if sb else 0, np.uint8), (rows * G if sb else 0, np.uint8),
                 (param_code_bytes(rows * G, code_bits) if sb else 0, np.uint8)]
        arena = self._out_pool.take(arena_bytes(parts))
        packed, scales, zeros, sb_scales, sb_zeros, a_codes, c_codes, codes = carve(arena, parts)
        sums = ErrorSums()
        kept: Optional[np.ndarray] = None
        for r, raw in units:
            n = raw.size // max(1, src_row)
            g0, g1 = r * G, (r + n) * G
            try:
                s = self.quantizer.quantize_rows(
                    t.name, raw, t.dtype, n, cols, plan.spec, ChunkBuffers(
                        packed[r * row_bytes:(r + n) * row_bytes], scales[g0:g1], zeros[g0:g1],
                        sb_scales[r * S:(r + n) * S] if sb else None,
                        sb_zeros[r * S:(r + n) * S] if sb else None,
                        a_codes[g0:g1] if sb else None, c_codes[g0:g1] if sb else None),
                    importance=plan.importance, equalization=plan.equalization,
                    row_offset=chunk.row_start + r, levels=self._grid_levels(t, plan))
            except ValidationError as exc:  # the engine placed it in the tensor; add the file
                raise ValidationError(with_location(str(exc), self.source.location(t.name))) \
                    from None
            sums.merge(s)
            if keep_source:
                kept = raw
            elif recycle is not None:
                recycle(raw)
        if sb:
            rec = self._record(t, plan, chunk, packed, sb_scales, sb_zeros)
            core.pack_param_codes(a_codes, c_codes, code_bits, codes)  # what pack_codes gives
            rec.param_codes = codes
            rec.param_code_bits = code_bits
            rec.superblock_groups = superblock_groups(plan.group_size)
            rec.group_params = (scales, zeros)
        else:
            rec = self._record(t, plan, chunk, packed, scales, zeros)
        rec.arena = arena
        if plan.spec.grid:
            rec.code_levels = self._grid_levels(t, plan)
        return rec, sums, kept

    def _discard(self, rec: ChunkRecord) -> None:
        """A record that will not be written: its arena back to the pool."""
        if rec.arena is not None:
            self._out_pool.give(rec.arena)
            rec.arena = None

    def _grid_levels(self, t: TensorInfo, plan: TensorPlan) -> Optional[np.ndarray]:
        """A tensor's code grid table (FORMAT.md 10.1), one for all its chunks:
        the fixed one, or one learned from the whole tensor (read once more; a
        function of the values and importance, so --resume finds the same)."""
        spec = plan.spec
        if spec is None or not spec.grid:
            return None
        key = f"{t.name}\0{spec.method}\0{spec.bits}\0{spec.group_size}"
        if key not in self._levels:
            from ..engine.dtypes import to_float32
            from ..engine.finite import check_finite
            from ..engine.grid import levels_for

            x2 = None
            if spec.grid == "learned":
                x2 = to_float32(self.source.read(t.name, 0, t.rows), t.dtype).reshape(t.rows, -1)
                check_finite(x2, name=t.name, cols=t.cols)
            w = None if plan.importance is None else np.asarray(plan.importance, np.float32)
            try:
                self._levels[key] = levels_for(x2, spec.bits, spec.group_size, spec.grid,
                                               None if w is None else w.reshape(-1), t.name)
            except ValidationError as exc:
                raise ValidationError(with_location(str(exc), self.source.location(t.name))) \
                    from None
        return self._levels[key]

    def _record(self, t: TensorInfo, plan: TensorPlan, chunk: Chunk, data: np.ndarray,
                scales: Optional[np.ndarray], zeros: Optional[np.ndarray]) -> ChunkRecord:
        quantized = plan.bits is not None
        spatial = plan.spatial_json
        if quantized and plan.equalization is not None and spatial is None:
            spatial = json.dumps({"method": "channel_equalization",
                                  "scales": [float(v) for v in np.asarray(plan.equalization)]})
        return ChunkRecord(
            layer_name=t.name, row_start=chunk.row_start, row_count=chunk.row_count,
            shape=tuple(t.shape), dtype=t.dtype, data=data, num_params=t.numel,
            quant_type=plan.spec.quant_type if quantized else "none",
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
                rec, s, _ = self._quantize_chunk(t, plan, c, units,
                                                 recycle=self._sync_reads.give_back)
                self._discard(rec)
                sums.merge(s)
            wider = self._next_width(t, plan, sums, decisions)
            if wider is None:
                return plan
            plan = wider

    def _hold_bits(self, ti: int, t: TensorInfo, plan: TensorPlan, layout: "TensorLayout",
                   prefetch: "Prefetcher", decisions: List[str],
                   ) -> Tuple[TensorPlan, Dict[int, Tuple[ChunkRecord, ErrorSums]]]:
        """For a tensor of a few chunks with a quality floor: quantize every
        chunk and hold the results until the tensor's cosine is known (the
        same decisions as _probe_bits, without quantizing the tensor twice);
        a redo at a wider width reads the chunks again."""
        first = True
        while True:
            held: Dict[int, Tuple[ChunkRecord, ErrorSums]] = {}
            sums = ErrorSums()
            for c in layout.chunks:
                self._check_cancel()
                if first:
                    units: Iterable[Tuple[int, np.ndarray]] = prefetch.units(ti, c.index)
                    recycle = prefetch.recycle if layout.pooled else None
                else:
                    units = self._sync_units(t, c, layout.unit_rows[c.index])
                    recycle = self._sync_reads.give_back
                rec, s, _ = self._quantize_chunk(t, plan, c, units, recycle=recycle)
                held[c.index] = (rec, s)
                sums.merge(s)
            first = False
            wider = self._next_width(t, plan, sums, decisions)
            if wider is None:
                return plan, held
            for rec, _ in held.values():
                self._discard(rec)
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
        unit_rows = {c.index: self._unit_rows(t, plan, c) for c in chunks}
        # Streamed units are read into pooled buffers, given back once the
        # engine is done with them; a whole chunk (the bytes of a kept tensor
        # become its output row; a weighted or reference one may be redone
        # from them) gets its own.
        return TensorLayout(chunks, done, unit_rows, pooled=self._streamed(plan))

    def run_tensor(self, ti: int, t: TensorInfo, plan: TensorPlan,
                   layout: "TensorLayout", prefetch: "Prefetcher") -> TensorRecord:
        start = time.perf_counter()
        chunks, done = layout.chunks, layout.done
        decisions: List[str] = []
        if done:
            plan, decisions = resumed_plan(plan, done)
        held: Dict[int, Tuple[ChunkRecord, ErrorSums]] = {}
        if not done and self.probes(plan, len(chunks)):
            if len(chunks) <= HOLD_CHUNKS:
                plan, held = self._hold_bits(ti, t, plan, layout, prefetch, decisions)
            else:
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
                    markov = merge_markov(markov, MarkovMetrics(**info["markov"]))
                self._put(WriteItem(ti, c.index, None, info, tensor_bytes))
                self._advance(ti, t, c.row_count)
                continue
            if c.index in held:
                rec, s = held.pop(c.index)
            else:
                plan, rec, s = self.quantize_planned(
                    t, plan, c, prefetch.units(ti, c.index), len(chunks) == 1, decisions,
                    unit_rows=layout.unit_rows[c.index],
                    recycle=prefetch.recycle if layout.pooled else None)
            sums.merge(s)
            info, chunk_markov = self.chunk_info(ti, t, plan, c, rec, s, decisions)
            if chunk_markov is not None:
                markov = merge_markov(markov, chunk_markov)
            out_bytes += info["output_bytes"]
            self._put(WriteItem(ti, c.index, rec, info, tensor_bytes, rec.arena))
            self._advance(ti, t, c.row_count)
        if not done:
            self.final_check(t, plan, planned_bits, len(chunks), sums, decisions)
        record = self.tensor_record(t, plan, planned_bits, len(chunks), sums, out_bytes, markov,
                                    decisions, time.perf_counter() - start)
        if self.on_tensor:
            self.on_tensor(record)
        return record

    # -- the steps of a tensor (the Ray executor, run/ray_executor.py, takes the same) --
    def probes(self, plan: TensorPlan, n_chunks: int) -> bool:
        """Whether a tensor's width is measured over all its chunks before any
        is written (several chunks and a quality floor with a way out)."""
        return plan.floor() is not None and n_chunks > 1 and bool(
            plan.fallback_bits or self.opts.fail_fast)

    def quantize_planned(self, t: TensorInfo, plan: TensorPlan, c: Chunk,
                         units: Iterable[Tuple[int, np.ndarray]], single: bool,
                         decisions: List[str], unit_rows: Optional[int] = None,
                         recycle: Optional[Callable[[np.ndarray], None]] = None,
                         ) -> Tuple[TensorPlan, ChunkRecord, ErrorSums]:
        """A chunk at its plan's width; the only chunk of a tensor with a floor
        is redone at wider widths (appending to decisions): from the bytes
        already read when the chunk came in one unit of its own, otherwise
        read again (from the page cache) into the pooled buffers. `recycle`
        gets pooled units back. Returns the plan it ended at."""
        redo = plan.floor() is not None and single
        one_unit = unit_rows is None or unit_rows >= c.row_count
        if redo and one_unit and recycle is None:
            rec, s, raw = self._quantize_chunk(t, plan, c, units, keep_source=True)
            while (wider := self._next_width(t, plan, s, decisions)) is not None:
                plan = wider
                self._discard(rec)
                rec, s, _ = self._quantize_chunk(t, plan, c, [(0, raw)])
            return plan, rec, s
        rec, s, _ = self._quantize_chunk(t, plan, c, units, recycle=recycle)
        while redo and (wider := self._next_width(t, plan, s, decisions)) is not None:
            plan = wider
            self._discard(rec)
            rec, s, _ = self._quantize_chunk(
                t, plan, c, self._sync_units(t, c, unit_rows or max(1, c.row_count)),
                recycle=self._sync_reads.give_back)
        return plan, rec, s

    def chunk_info(self, ti: int, t: TensorInfo, plan: TensorPlan, c: Chunk, rec: ChunkRecord,
                   s: ErrorSums, decisions: List[str]) -> Tuple[Dict[str, Any],
                                                            Optional[MarkovMetrics]]:
        """What the staged part of a chunk records, and the chunk's Markov metrics."""
        chunk_markov = None
        group_params = rec.group_params or (rec.scales, rec.zero_points)
        if group_params[0] is not None and group_params[0].size:
            chunk_markov = markov_of_params(
                group_params[0], group_params[1], groups_per_row(t.cols, plan.group_size),
                plan.bits)
        info = {"tensor": t.name, "tensor_index": ti, "chunk": c.index,
                "row_start": c.row_start, "row_count": c.row_count, "bits": plan.bits,
                "sums": list(s.as_tuple()), "output_bytes": rec.stored_bytes,
                "decisions": decisions,
                "markov": dataclasses.asdict(chunk_markov) if chunk_markov else None}
        return info, chunk_markov

    def final_check(self, t: TensorInfo, plan: TensorPlan, planned_bits: Optional[int],
                    n_chunks: int, sums: ErrorSums, decisions: List[str]) -> None:
        """A tensor of several chunks with a floor, not resumed: the floor
        checked over all its chunks (an error under fail_fast, a decision
        otherwise)."""
        if plan.floor() is not None and n_chunks > 1 and plan.bits == planned_bits:
            self._next_width(t, dataclasses.replace(plan, fallback_bits=()), sums, decisions)

    def tensor_record(self, t: TensorInfo, plan: TensorPlan, planned_bits: Optional[int],
                      n_chunks: int, sums: ErrorSums, out_bytes: int,
                      markov: Optional[MarkovMetrics], decisions: List[str],
                      seconds: float) -> TensorRecord:
        """The report's record of a finished tensor."""
        m = sums.metrics() if plan.bits is not None else None
        reason = plan.reason
        if plan.bits != planned_bits or any("redone" in d for d in decisions):
            reason = f"{reason}; fallback to int{plan.bits} (cosine floor)"
        extra = dict(plan.extra)
        if markov is not None:
            extra["markov"] = markov.as_dict()
        return TensorRecord(
            name=t.name, shape=tuple(t.shape), dtype=t.dtype,
            quant_type=f"int{plan.bits}" if plan.bits else "none", bits=plan.bits, reason=reason,
            group_size=plan.group_size if plan.bits else None,
            scheme=plan.scheme if plan.bits else None, method=plan.method if plan.bits else None,
            param_dtype=plan.param_dtype if plan.bits else None, chunks=n_chunks,
            input_bytes=t.nbytes, output_bytes=out_bytes, seconds=seconds,
            cosine=m.cosine if m else None, rel_mse=m.rel_mse if m else None,
            sqnr_db=m.sqnr_db if m else None, max_abs_error=m.max_abs_error if m else None,
            decisions=decisions, extra=extra,
        )

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
        reads = [read for ti, (t, lay) in enumerate(zip(self.source.tensors, layouts))
                 for c in lay.chunks if c.index not in lay.done
                 for read in chunk_reads(ti, t, c, lay.unit_rows[c.index], lay.pooled)]
        prefetch = Prefetcher(self.source, reads, read_ahead_budget(self.opts))
        try:
            for ti, t in enumerate(self.source.tensors):
                records.append(self.run_tensor(ti, t, self.plans[t.name], layouts[ti], prefetch))
        finally:
            prefetch.close()
            self._write_q.put(None)
            writer.join()
            self._out_pool.clear()
            self._sync_reads.clear()
            if self._writer_error is not None or len(records) < len(self.source.tensors):
                self.shards.abort()
        if self._writer_error is not None:
            raise self._writer_error
        return records

    def finish(self) -> List[str]:
        """Final names for the output files (and the index when sharded)."""
        return self.shards.finish()


def resumed_plan(plan: TensorPlan, done: Dict[int, Dict[str, Any]]) -> Tuple[TensorPlan, List[str]]:
    """A tensor an interrupted run staged chunks of: the width (and the
    decisions) were taken before the interruption."""
    first = next(iter(done.values()))
    return dataclasses.replace(plan, bits=first["bits"]), list(first.get("decisions", []))


@dataclass
class WriteItem:
    """A chunk for the writer thread: its record, or None to replay the part
    an interrupted run staged."""

    tensor_index: int
    chunk_index: int
    record: Optional[ChunkRecord]
    info: Dict[str, Any]
    tensor_bytes: int
    arena: Optional[np.ndarray] = None  # the record's pooled buffers, given back once written
