"""Runs a planned model on a Ray cluster (`--executor ray`, docs/ray.md).

The driver opens the source, plans, cuts chunks and lays out the shards
exactly as the single-machine run (run/streaming.py). It then groups the
chunks still to do into work units, each a contiguous range of one input
file, and hands them to Ray tasks (run/ray_tasks.py), which return each
chunk's record and part info. The driver stages every finished chunk as the
resumable run does, appends the chunks to the output files in order and
builds the report, so the directory is byte-identical to a one-machine run
(the timing fields aside) and `--resume`, with or without Ray, finishes a run
whose driver was killed. Ray is imported inside functions only.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..engine.metrics import ErrorSums, MarkovMetrics
from ..errors import ArrowQuantError, ConfigurationError, MemoryBudgetError, QuantizationError
from ..formats.v2_schema import ChunkRecord
from ..planning.plan import TensorPlan
from ..sizes import format_size
from ..sources.base import ModelSource, TensorInfo
from ..version import __version__
from .layout import PipelineOptions, output_row_bytes
from .ray_tasks import (KILL_ENV, UNIT_BYTES, UnitChunk, UnitContext, UnitResult, WorkUnit,
                        group_units, run_unit, tensor_table)
from .report import TensorRecord, merge_markov
from .staging import part_name, read_part, write_part
from .layout import TensorLayout
from .streaming import StreamingQuantizer, resumed_plan


@dataclass(frozen=True)
class RayOptions:
    """How the driver uses the cluster."""

    address: Optional[str] = None     # None: RAY_ADDRESS, else a local cluster
    cpus_per_task: int = 0            # 0: the engine's thread count (0: a whole node)
    unit_bytes: int = UNIT_BYTES      # source bytes per work unit (at most a chunk's)
    max_retries: int = 3              # retries of a task whose process died
    on_unit: Optional[Callable[[Dict[str, Any]], None]] = None
    kill_unit: Optional[Tuple[int, str]] = None


def options_from_env(address: Optional[str], cpus_per_task: int,
                     on_unit: Optional[Callable[[Dict[str, Any]], None]]) -> RayOptions:
    kill = None
    hook = os.environ.get(KILL_ENV)
    if hook:
        n, _, marker = hook.partition(":")
        kill = (int(n), marker)
    return RayOptions(address=address, cpus_per_task=cpus_per_task, on_unit=on_unit,
                      kill_unit=kill)



# ---------------------------------------------------------------- the driver


@dataclass
class _Tensor:
    """A tensor while the driver runs it."""

    ti: int
    t: TensorInfo
    plan: TensorPlan
    layout: TensorLayout
    decisions: List[str]
    probing: bool                     # width measured over all chunks, not decided yet
    planned_bits: Optional[int]
    tensor_bytes: int                 # planned output bytes (decides shard boundaries)
    final: Dict[int, Tuple[Optional[ChunkRecord], Dict[str, Any]]] = field(default_factory=dict)
    trial: Dict[int, Tuple[ChunkRecord, Dict[str, Any]]] = field(default_factory=dict)
    start: float = 0.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError("--executor ray needs Ray: pip install 'arrowquant[ray]'") \
            from None
    return ray


def connect(address: Optional[str]) -> Any:
    """Ray, connected to the cluster (a Ray already initialized in this
    process is used as it is); called before the output directory is
    touched. ConfigurationError when Ray is missing or refuses."""
    ray = _ray()
    if not ray.is_initialized():
        import logging

        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigurationError(f"Ray cluster {address or '(local)'}: cannot connect "
                                     f"({type(exc).__name__}: {exc})") from None
    return ray


class RayQuantizer(StreamingQuantizer):
    """StreamingQuantizer whose chunks are quantized by Ray tasks (module doc)."""

    def __init__(self, source: ModelSource, plans: Dict[str, TensorPlan], out_dir: Path,
                 opts: PipelineOptions, input_path: Path, ray_opts: RayOptions,
                 progress: Any = None, on_tensor: Any = None, cancel: Any = None):
        super().__init__(source, plans, out_dir, opts, progress=progress, on_tensor=on_tensor,
                         cancel=cancel)
        self.input_path = Path(input_path).resolve()
        self.ray_opts = ray_opts
        self.units_done: List[Dict[str, Any]] = []
        self.cluster: Dict[str, Any] = {}

    # -- setup -------------------------------------------------------------
    def _resources(self, ray: Any, units: List[WorkUnit]) -> Tuple[int, int]:
        """(CPUs per task, tasks the cluster runs at once); refuses a unit no
        node has the CPUs or the memory for (Ray would wait forever)."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
        mems = [int(n["Resources"].get("memory", 0)) for n in nodes]
        if not cpus or max(cpus) < 1:
            raise ConfigurationError("the Ray cluster has no node with a CPU")
        per_task = self.ray_opts.cpus_per_task or self.opts.threads or min(c for c in cpus if c)
        if per_task > max(cpus):
            raise ConfigurationError(f"--ray-cpus-per-task {per_task}: the largest Ray node has "
                                     f"{max(cpus)} CPUs")
        need = max((u.memory for u in units), default=0)
        if need > max(mems):
            raise MemoryBudgetError(f"a work unit needs {format_size(need)} of memory, the largest "
                                    f"Ray node offers {format_size(max(mems))}; lower --chunk-size")
        slots = sum(min(c // per_task, m // max(1, need)) if need else c // per_task
                    for c, m in zip(cpus, mems))
        self.cluster = {"nodes": len(nodes), "cpus": sum(cpus), "cpus_per_task": per_task,
                        "slots": max(1, slots)}
        return per_task, max(1, slots)

    def _tensor_state(self, ti: int, t: TensorInfo) -> _Tensor:
        plan = self.plans[t.name]
        layout = self.layout(ti, t, plan)
        decisions: List[str] = []
        probing = False
        if layout.done:
            plan, decisions = resumed_plan(plan, layout.done)
        else:
            probing = self.probes(plan, len(layout.chunks))
        st = _Tensor(ti, t, plan, layout, decisions, probing, plan.bits,
                     max(1, t.rows) * output_row_bytes(t, plan), start=time.perf_counter())
        for ci, info in layout.done.items():
            st.final[ci] = (None, info)
        return st

    def _pending(self, st: _Tensor) -> List[UnitChunk]:
        single = len(st.layout.chunks) == 1
        return [UnitChunk(st.ti, c, st.layout.unit_rows[c.index], st.plan, single)
                for c in st.layout.chunks if c.index not in st.layout.done]

    # -- results -----------------------------------------------------------
    def _accept(self, states: List[_Tensor], result: UnitResult, redo: Deque[WorkUnit],
                next_index: List[int], unit_bytes: int,
                errors: Dict[Tuple[int, int], BaseException]) -> int:
        """Files the chunks of a finished unit; returns the output bytes now
        held in memory by the driver (negative when a redo dropped some).
        Errors are filed at the chunk one machine would have raised them at."""
        held = 0
        if result.error is not None:
            ti, ci, exc = result.error
            errors[(ti, ci)] = exc
        for ti, ci, rec, info in result.chunks:
            st = states[ti]
            held += rec.stored_bytes
            if st.probing:
                st.trial[ci] = (rec, info)
                if len(st.trial) == len(st.layout.chunks):
                    try:
                        held += self._decide(st, redo, next_index, unit_bytes)
                    except ArrowQuantError as exc:  # below the floor under fail_fast
                        errors[(ti, 0)] = exc
            else:
                self._stage(st, ci, rec, info)
        return held

    def _decide(self, st: _Tensor, redo: Deque[WorkUnit], next_index: List[int],
                unit_bytes: int) -> int:
        """A tensor measured at one width over all its chunks: kept, or redone
        at the next width, as StreamingQuantizer._probe_bits decides."""
        sums = ErrorSums()
        for ci in sorted(st.trial):
            sums.merge(ErrorSums(*st.trial[ci][1]["sums"]))
        wider = self._next_width(st.t, st.plan, sums, st.decisions)
        if wider is not None:
            dropped = sum(rec.stored_bytes for rec, _ in st.trial.values())
            st.plan, st.trial = wider, {}
            units = group_units(self.source, self._pending(st), unit_bytes, self.opts,
                                next_index[0])
            next_index[0] += len(units)
            redo.extend(units)
            return -dropped
        st.probing, st.planned_bits = False, st.plan.bits
        st.tensor_bytes = max(1, st.t.rows) * output_row_bytes(st.t, st.plan)
        for ci in sorted(st.trial):
            rec, info = st.trial[ci]
            info["decisions"] = list(st.decisions)
            self._stage(st, ci, rec, info)
        st.trial = {}
        return 0

    def _stage(self, st: _Tensor, ci: int, rec: ChunkRecord, info: Dict[str, Any]) -> None:
        write_part(self.staging / part_name(st.ti, ci), rec, info)
        st.final[ci] = (rec, info)

    def _drain(self, states: List[_Tensor], order: List[Tuple[int, int]], pos: int,
               records: List[TensorRecord],
               errors: Dict[Tuple[int, int], BaseException]) -> Tuple[int, int]:
        """Appends the finished chunks at the head of the run's order to the
        output files; returns the new head and the bytes released. An error
        filed at the head is raised: every chunk before it went well."""
        released = 0
        while pos < len(order):
            ti, ci = order[pos]
            if (ti, ci) in errors:
                raise errors[(ti, ci)]
            st = states[ti]
            if st.probing:  # one machine measures it all before writing: its first error
                failed = sorted(c for t, c in errors if t == ti)
                if failed:
                    raise errors[(ti, failed[0])]
            if ci not in st.final:
                break
            rec, info = st.final[ci]
            if rec is None:
                rec = read_part(self.staging / part_name(ti, ci))
            else:
                released += rec.stored_bytes
            if ci == 0:
                self.shards.begin_tensor(rec.layer_name, st.tensor_bytes)
            self.shards.write(rec)
            st.final[ci] = (None, info)
            pos += 1
            if ci == len(st.layout.chunks) - 1:
                records.append(self._tensor_done(st))
        return pos, released

    def _tensor_done(self, st: _Tensor) -> TensorRecord:
        """The tensor's record from its chunks' infos, as a resumed run builds it."""
        sums = ErrorSums()
        out_bytes = 0
        markov: Optional[MarkovMetrics] = None
        infos = [st.final[c.index][1] for c in st.layout.chunks]
        for info in infos:
            sums.merge(ErrorSums(*info["sums"]))
            out_bytes += info["output_bytes"]
            if info.get("markov"):
                markov = merge_markov(markov, MarkovMetrics(**info["markov"]))
        plan = dataclasses.replace(st.plan, bits=infos[-1]["bits"])
        decisions = st.decisions
        if len(st.layout.chunks) == 1 and not st.layout.done:
            decisions = list(infos[0].get("decisions", []))  # taken by the task
        n = len(st.layout.chunks)
        if not st.layout.done:
            self.final_check(st.t, plan, st.planned_bits, n, sums, decisions)
        record = self.tensor_record(st.t, plan, st.planned_bits, n, sums, out_bytes, markov,
                                    decisions, time.perf_counter() - st.start)
        if self.on_tensor:
            self.on_tensor(record)
        return record

    # -- the run -----------------------------------------------------------
    def run(self) -> List[TensorRecord]:
        ray = connect(self.ray_opts.address)
        self.staging.mkdir(parents=True, exist_ok=True)
        states = [self._tensor_state(ti, t) for ti, t in enumerate(self.source.tensors)]
        order = [(st.ti, c.index) for st in states for c in st.layout.chunks]
        unit_bytes = min(self.ray_opts.unit_bytes, self.opts.chunk_size)
        pending = [uc for st in states for uc in self._pending(st)]
        queue: Deque[WorkUnit] = collections.deque(
            group_units(self.source, pending, unit_bytes, self.opts, 0))
        first_units = len(queue)
        next_index = [first_units]
        per_task, slots = self._resources(ray, list(queue))
        ctx = UnitContext(
            str(self.input_path), dataclasses.replace(self.opts, threads=self.opts.threads or per_task),
            tuple((str(p), Path(p).stat().st_size) for p in self.source.weight_files),
            tensor_table(self.source.tensors), __version__, self.ray_opts.kill_unit)
        ctx_ref = ray.put(ctx)
        task = ray.remote(run_unit)
        max_inflight = 2 * slots
        budget = max(self.opts.max_memory, 2 * max_inflight * max(
            (u.memory for u in queue), default=0))
        redo: Deque[WorkUnit] = collections.deque()
        inflight: Dict[Any, Tuple[WorkUnit, float]] = {}
        records: List[TensorRecord] = []
        total = max(1, sum(u.nbytes for u in queue))
        done_bytes, held, pos = 0, 0, 0
        errors: Dict[Tuple[int, int], BaseException] = {}
        complete = False
        try:
            pos, _ = self._drain(states, order, pos, records, errors)
            while pos < len(order):
                self._check_cancel()
                while len(inflight) < max_inflight and (redo or (
                        queue and held < budget and not self._past_error(queue[0], errors))):
                    u = redo.popleft() if redo else queue.popleft()
                    ref = task.options(num_cpus=per_task, memory=u.memory,
                                       max_retries=self.ray_opts.max_retries,
                                       retry_exceptions=False).remote(ctx_ref, u)
                    inflight[ref] = (u, time.time())
                if not inflight:
                    raise QuantizationError("the Ray driver has nothing to wait for but the run "
                                            "is not complete (a bug)")
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    u, submitted = inflight.pop(ref)
                    result = self._result(ray, ref, u)
                    held += self._accept(states, result, redo, next_index, unit_bytes, errors)
                    done_bytes += u.nbytes
                    if u.index >= first_units:  # a width redone
                        total += u.nbytes
                    self._unit_finished(u, result, submitted, done_bytes / total)
                pos, released = self._drain(states, order, pos, records, errors)
                held -= released
            complete = True
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)
            if not complete:
                self.shards.abort()
        return records

    @staticmethod
    def _past_error(u: WorkUnit, errors: Dict[Tuple[int, int], BaseException]) -> bool:
        """Whether a unit lies after a chunk that failed (no need to run it)."""
        first = (u.chunks[0].ti, u.chunks[0].chunk.index)
        return any(first > e for e in errors)

    def _result(self, ray: Any, ref: Any, u: WorkUnit) -> UnitResult:
        """The unit's result; a task's own error (NaN, a corrupt file) is
        raised as it was raised in the task, naming the tensor and the file."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ArrowQuantError):
                raise cause from None
            raise QuantizationError(f"{self._where(u)}: the Ray task failed: "
                                    f"{type(cause or exc).__name__}: {cause or exc}") from None
        except ray.exceptions.RayError as exc:
            raise QuantizationError(
                f"{self._where(u)}: the Ray task was lost ({type(exc).__name__}: {exc}); the "
                "staged chunks are kept, rerun with --resume") from None

    def _where(self, u: WorkUnit) -> str:
        names = sorted({self.source.tensors[uc.ti].name for uc in u.chunks})
        return f"{u.file}: work unit {u.index} (tensor {names[0]!r}" + \
            (f" and {len(names) - 1} more)" if len(names) > 1 else ")")

    def _unit_finished(self, u: WorkUnit, r: UnitResult, submitted: float,
                       fraction: float) -> None:
        stat = {"unit": u.index, "chunks": len(u.chunks), "bytes": u.nbytes,
                "memory": u.memory, "worker": r.worker, "submitted": submitted,
                "received": time.time(), "started": r.start, "ended": r.end,
                "task_seconds": r.end - r.start,
                "task_cpu_seconds": r.cpu_seconds, "peak_rss": r.peak_rss}
        stat["message"] = (f"unit {u.index + 1} on {r.worker}: {len(u.chunks)} chunk(s), "
                           f"{format_size(u.nbytes)} in {r.end - r.start:.2f} s")
        self.units_done.append(stat)
        if self.ray_opts.on_unit:
            self.ray_opts.on_unit(stat)
        if self.progress:
            self.progress(f"{len(self.units_done)} units, {r.worker}", min(1.0, fraction))

    def details(self) -> Dict[str, Any]:
        """Per worker: units, source bytes, busy seconds, peak RSS (the
        summary's details; -v prints them)."""
        workers: Dict[str, Dict[str, Any]] = {}
        for s in self.units_done:
            w = workers.setdefault(s["worker"], {"units": 0, "bytes": 0, "busy_seconds": 0.0,
                                                 "peak_rss": 0})
            w["units"] += 1
            w["bytes"] += s["bytes"]
            w["busy_seconds"] += s["task_seconds"]
            w["peak_rss"] = max(w["peak_rss"], s["peak_rss"])
        return {"ray": {**self.cluster, "units": len(self.units_done), "workers": workers,
                        "unit_stats": self.units_done}}


def worker_lines(details: Dict[str, Any]) -> List[str]:
    """Lines for -v: the units each Ray worker ran."""
    ray = details.get("ray", {})
    return [f"ray worker {w}: {s['units']} units, {format_size(s['bytes'])}, busy "
            f"{s['busy_seconds']:.1f} s, peak RSS {format_size(s['peak_rss'])}"
            for w, s in sorted(ray.get("workers", {}).items())]

