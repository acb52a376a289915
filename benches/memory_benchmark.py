#!/usr/bin/env python3
"""Memory and time of quantizing synthetic models: native engine vs numpy reference.

Every job (model generation, native quantization, reference quantization,
pure I/O, output comparison) runs in a fresh child process, one job per
process. The parent takes the child's true peak RSS from os.wait4, samples an
RSS timeline with psutil, and the child reports its RSS after imports
(baseline), the quantization time and tracemalloc's peak (Python heap only).
The native and reference outputs are compared bit for bit in the same run.

    python benches/memory_benchmark.py --model-size 10M
    python benches/memory_benchmark.py --model-size 100M --model-size 600M --bit-width 4 --bit-width 8 \\
        --generate-charts
    python benches/memory_benchmark.py --charts-from .benchmarks/memory   # redraw charts of a run
    python benches/memory_benchmark.py --markdown-from .benchmarks/memory # its targets table in markdown
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

SIZES = ("10M", "100M", "600M", "7B")
ALL_SIZES = ("100M", "600M", "7B")      # --all: the sizes the targets are set for
FORMATS = ("parquet", "safetensors")
IMPLEMENTATIONS = ("native", "reference")
IO_JOB = "io"
GROUP_SIZE = 128
#: Sizes whose generated models are kept without --keep-models (small enough to cache).
CACHE_LIMIT_BYTES = 1 << 30


# =============================================================================
# Child side: one job per process. Only this half imports numpy/pyarrow/arrowquant.
# =============================================================================


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _child_versions() -> Dict[str, str]:
    import numpy
    import pyarrow

    import arrowquant

    return {"arrowquant": arrowquant.__version__, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "kernel": arrowquant.active_kernel()}


def child_generate(spec: dict) -> dict:
    import time

    from arrowquant import synthetic

    out = Path(spec["model_dir"])
    cached = synthetic.read_manifest(out) is not None
    t0 = time.perf_counter()
    synthetic.generate_model(out, spec["size"], fmt=spec["format"], seed=spec["seed"])
    return {"seconds": time.perf_counter() - t0, "was_cached": cached,
            "params": synthetic.count_params(spec["size"]), "bytes": _dir_bytes(out)}


def child_info(spec: dict) -> dict:
    """Parameter count, weight bytes and cache state of each size class (kept out of
    the parent so that it never imports numpy or arrowquant)."""
    from arrowquant import synthetic

    out = {}
    for size in spec["sizes"]:
        dirs = {fmt: Path(spec["models_dir"]) / model_dir_name(size, fmt, spec["seed"]) for fmt in spec["formats"]}
        out[size] = {"params": synthetic.count_params(size), "bytes": synthetic.model_bytes(size),
                     "cached": all(synthetic.read_manifest(d) is not None for d in dirs.values())}
    return out


def model_dir_name(size: str, fmt: str, seed: int) -> str:
    return f"{size}-{fmt}-seed{seed}"


def child_quantize(spec: dict) -> dict:
    import time
    import tracemalloc

    import pyarrow.parquet  # noqa: F401  (both engines write Parquet: part of the baseline)

    import arrowquant

    versions = _child_versions()
    baseline = bc.rss_mb()
    if spec.get("tracemalloc", False):
        tracemalloc.start()
    t0 = time.perf_counter()
    summary = arrowquant.quantize(spec["input"], spec["output"], bits=spec["bits"],
                                  group_size=spec["group_size"], engine=spec["implementation"],
                                  method=spec["method"], param_dtype=spec["param_dtype"],
                                  threads=spec["threads"], overwrite=True)
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] / bc.MB if tracemalloc.is_tracing() else None
    tracemalloc.stop()
    return {"baseline_rss_mb": baseline, "seconds": seconds, "tracemalloc_peak_mb": traced,
            "vm_hwm_mb": bc.vm_hwm_mb(), "versions": versions,
            "params": int(summary.params), "tensors": int(summary.tensors),
            "input_bytes": int(summary.input_bytes), "output_bytes": _dir_bytes(Path(spec["output"])),
            "mean_cosine": float(summary.mean_cosine)}


def child_io(spec: dict) -> dict:
    """Pure I/O: read every tensor once through the project's reader, write
    `target_bytes` (the native output's size) of it to one file and fsync it."""
    import time
    import tracemalloc

    import pyarrow.parquet  # noqa: F401  (same baseline as the quantize jobs)

    from arrowquant.sources import open_model

    versions = _child_versions()
    baseline = bc.rss_mb()
    if spec.get("tracemalloc", False):
        tracemalloc.start()
    t0 = time.perf_counter()
    remaining = int(spec["target_bytes"])
    read_bytes = 0
    src = open_model(spec["input"])
    try:
        with open(spec["output"], "wb") as f:
            for t in src.tensors:
                rows = t.rows
                row_bytes = max(1, t.nbytes // max(1, rows))
                step = max(1, spec["chunk_bytes"] // row_bytes)
                for r0 in range(0, rows, step):
                    buf = src.read(t.name, r0, min(step, rows - r0))
                    read_bytes += buf.nbytes
                    if remaining > 0:
                        n = min(remaining, buf.nbytes)
                        f.write(memoryview(buf.reshape(-1))[:n])
                        remaining -= n
            if remaining > 0:  # never for quantization (output < input); keeps the size honest
                f.write(b"\0" * remaining)
            f.flush()
            os.fsync(f.fileno())  # the pipeline fsyncs what it writes; so does this job
    finally:
        src.close()
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] / bc.MB if tracemalloc.is_tracing() else None
    tracemalloc.stop()
    return {"baseline_rss_mb": baseline, "seconds": seconds, "tracemalloc_peak_mb": traced,
            "vm_hwm_mb": bc.vm_hwm_mb(), "versions": versions, "input_bytes": read_bytes,
            "output_bytes": _dir_bytes(Path(spec["output"]))}


def _v2_digests(out_dir: Path) -> Dict[Tuple[str, int], Tuple[str, str, str]]:
    """(layer_name, row_start) -> sha256 of data, scales, zero_points; one row group at a time."""
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq

    def digest(col) -> str:
        h = hashlib.sha256()
        if hasattr(col, "values") and not hasattr(col, "as_buffer"):
            h.update(np.asarray(col.values).tobytes())      # list<float>
        else:
            h.update(col.as_buffer())                        # binary scalar
        return h.hexdigest()

    found: Dict[Tuple[str, int], Tuple[str, str, str]] = {}
    files = sorted(out_dir.glob("*.parquet")) if out_dir.is_dir() else [out_dir]
    if not files:
        raise FileNotFoundError(f"no Parquet output in {out_dir}")
    cols = ["layer_name", "row_start", "data", "scales", "zero_points"]
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(rg, columns=cols)
            for i in range(t.num_rows):
                key = (t["layer_name"][i].as_py(), int(t["row_start"][i].as_py()))
                found[key] = (digest(t["data"][i]), digest(t["scales"][i]), digest(t["zero_points"][i]))
    return found


def child_compare(spec: dict) -> dict:
    a = _v2_digests(Path(spec["a"]))
    b = _v2_digests(Path(spec["b"]))
    mismatches = sorted({k[0] for k in set(a) ^ set(b)} |
                        {k[0] for k in set(a) & set(b) if a[k] != b[k]})
    return {"equal": not mismatches and len(a) > 0, "rows": len(a), "mismatches": mismatches[:20]}


CHILD_JOBS = {"info": child_info, "generate": child_generate, "quantize": child_quantize, "io": child_io,
              "compare": child_compare}


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = CHILD_JOBS[spec["job"]](spec)
    bc.write_json(Path(spec["result"]), result)
    return 0


# =============================================================================
# Parent side: orchestration, records, report, charts. Standard library only.
# =============================================================================


class JobError(RuntimeError):
    pass


@dataclass
class JobResult:
    run: bc.ChildRun
    data: dict

    @property
    def quantization_memory_mb(self) -> float:
        return self.run.peak_rss_mb - self.data["baseline_rss_mb"]


@dataclass
class Case:
    size: str
    fmt: str
    bits: int
    records: List[dict] = field(default_factory=list)
    bit_exact: Optional[bool] = None
    mismatches: List[str] = field(default_factory=list)
    timelines: Dict[str, List[Tuple[float, float]]] = field(default_factory=dict)
    targets: Dict[str, dict] = field(default_factory=dict)


def run_job(job: str, spec: dict, work: Path, timeout: Optional[float] = None) -> JobResult:
    result_path = work / f"result-{job}-{os.getpid()}.json"
    if result_path.exists():
        result_path.unlink()
    spec = dict(spec, job=job, result=str(result_path))
    cmd = [bc.python_exe(), str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    run = bc.run_child(cmd, env=bc.child_env(), timeout=timeout)
    if run.returncode != 0 or not result_path.exists():
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise JobError(f"{job} job failed (exit {run.returncode}):\n{tail}")
    data = json.loads(result_path.read_text())
    result_path.unlink()
    return JobResult(run=run, data=data)


def estimate_quantized_bytes(params: int, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Codes plus a float32 scale and zero point per group (an upper-bound estimate)."""
    return int(params * bits / 8 + params / group_size * 8)


def disk_needed(model_bytes: int, model_cached: bool, params: int, bits_list: Sequence[int],
                n_formats: int) -> int:
    """Bytes a size class needs: its models (unless cached) plus the largest set of
    outputs alive at once (native, reference, pure I/O), with a 10% margin."""
    out = 3 * max(estimate_quantized_bytes(params, b) for b in bits_list)
    need = (0 if model_cached else model_bytes * n_formats) + out
    return int(need * 1.1)


def check_disk(path: Path, needed: int) -> Tuple[bool, int]:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    return free >= needed, free


def aggregate(impl: str, case: Case, results: List[JobResult], common: dict,
              traced_mb: Optional[float] = None) -> dict:
    """One record from the timed runs of a job; `traced_mb` comes from the separate
    tracemalloc run (tracing slows Python code, so it never runs in a timed job)."""
    times = [r.data["seconds"] for r in results]
    peaks = [r.run.peak_rss_mb for r in results]
    qmem = [r.quantization_memory_mb for r in results]
    first = results[0].data
    t = bc.median(times)
    params = common["params"]
    record = {
        "implementation": impl,
        "model_size": case.size,
        "bit_width": case.bits,
        "input_format": case.fmt,
        "peak_memory_mb": round(max(peaks), 2),
        "baseline_memory_mb": round(bc.median([r.data["baseline_rss_mb"] for r in results]), 2),
        "quantization_memory_mb": round(max(qmem), 2),
        "quantization_time_s": round(t, 4),
        "timestamp": bc.timestamp(),
        "params": params,
        "throughput_mparams_s": round(params / t / 1e6, 2) if t > 0 else None,
        "throughput_mb_s": round(common["model_bytes"] / t / bc.MB, 1) if t > 0 else None,
        "tracemalloc_peak_mb_python_heap_only": None if traced_mb is None else round(traced_mb, 2),
        "vm_hwm_mb": first.get("vm_hwm_mb"),
        "sampled_file_backed_mb": round(max(r.run.sampled_file_backed_mb for r in results), 1),
        "time_runs_s": [round(x, 4) for x in times],
        "peak_memory_runs_mb": [round(x, 2) for x in peaks],
        "parent_rss_mb": round(max(r.run.parent_rss_mb for r in results), 1),
        "output_bytes": first.get("output_bytes"),
        "input_bytes": common["model_bytes"],
        "group_size": common.get("group_size", GROUP_SIZE),
        "method": common.get("method"),
        "param_dtype": common.get("param_dtype"),
        "threads": common["threads"],
        "repeat": len(results),
        "machine": common["machine"],
        "commit": common["commit"],
        "versions": dict(common["versions"], **first.get("versions", {})),
    }
    if impl != IO_JOB:
        record["mean_cosine"] = first.get("mean_cosine")
    return record


def evaluate_targets(case: Case) -> Dict[str, dict]:
    """The issue's targets for one (size, format, bits) case, each with value, limit and mark."""
    by = {r["implementation"]: r for r in case.records}
    nat, ref, io = by.get("native"), by.get("reference"), by.get(IO_JOB)
    out: Dict[str, dict] = {}
    if nat and ref:
        ratio = (nat["quantization_memory_mb"] / ref["quantization_memory_mb"]
                 if ref["quantization_memory_mb"] > 0 else None)
        out["memory_ratio"] = {"value": ratio, "target": f"<= {bc.RATIO_TARGET}",
                               "mark": bc.mark(None if ratio is None else ratio <= bc.RATIO_TARGET)}
        speedup = ref["quantization_time_s"] / nat["quantization_time_s"]
        out["speedup"] = {"value": speedup, "target": f">= {bc.SPEEDUP_TARGET:g}x",
                          "mark": bc.mark(speedup >= bc.SPEEDUP_TARGET)}
        out["bit_exact"] = {"value": case.bit_exact, "target": "native == reference",
                            "mark": bc.mark(case.bit_exact)}
    if nat and io:
        factor = nat["quantization_time_s"] / io["quantization_time_s"]
        out["io_bound"] = {"value": factor, "target": f"<= {bc.IO_BOUND_TARGET}x pure I/O",
                           "mark": bc.mark(factor <= bc.IO_BOUND_TARGET)}
    if nat and case.size in bc.TIME_TARGETS_S:
        limit = bc.TIME_TARGETS_S[case.size]
        out["time"] = {"value": nat["quantization_time_s"], "target": f"< {limit:g} s",
                       "mark": bc.mark(nat["quantization_time_s"] < limit)}
    return out


def run_case(case: Case, model: Path, work: Path, args: argparse.Namespace, common: dict,
             log) -> None:
    impls = ["native"] + ([] if args.skip_python else ["reference"])
    results: Dict[str, List[JobResult]] = {k: [] for k in impls + [IO_JOB]}
    outputs = {impl: work / f"out-{impl}" for impl in impls}
    io_out = work / "io.bin"

    def quantize_spec(impl: str, traced: bool = False) -> dict:
        return {"input": str(model), "output": str(outputs[impl]), "bits": case.bits,
                "group_size": args.group_size,
                "method": args.method, "param_dtype": args.param_dtype,
                "implementation": impl, "threads": args.threads, "tracemalloc": traced}

    def io_spec(traced: bool = False) -> dict:
        return {"input": str(model), "output": str(io_out), "chunk_bytes": 64 << 20,
                "target_bytes": results["native"][-1].data["output_bytes"], "tracemalloc": traced}

    for rep in range(args.repeat):
        # Alternate the order so neither engine always runs on a warmer machine.
        order = impls[rep % len(impls):] + impls[:rep % len(impls)]
        for impl in order:
            r = run_job("quantize", quantize_spec(impl), work)
            results[impl].append(r)
            log(f"    {impl:<9} rep {rep + 1}: {r.data['seconds']:.3f} s, peak {r.run.peak_rss_mb:.1f} MB, "
                f"quantization memory {r.quantization_memory_mb:.1f} MB")
        r = run_job("io", io_spec(), work)
        results[IO_JOB].append(r)
        log(f"    {'pure I/O':<9} rep {rep + 1}: {r.data['seconds']:.3f} s, peak {r.run.peak_rss_mb:.1f} MB")
        io_out.unlink(missing_ok=True)
    if not args.skip_python:
        cmp = run_job("compare", {"a": str(outputs["native"]), "b": str(outputs["reference"])}, work)
        case.bit_exact = bool(cmp.data["equal"])
        case.mismatches = cmp.data["mismatches"]
        log(f"    bit-exact native == reference: {case.bit_exact} ({cmp.data['rows']} rows compared)")
    traced: Dict[str, Optional[float]] = {k: None for k in results}
    if not args.no_tracemalloc:
        # One more, untimed run per job with tracemalloc on: tracing slows Python code.
        for impl in impls:
            traced[impl] = run_job("quantize", quantize_spec(impl, traced=True), work).data["tracemalloc_peak_mb"]
        traced[IO_JOB] = run_job("io", io_spec(traced=True), work).data["tracemalloc_peak_mb"]
        io_out.unlink(missing_ok=True)
        log("    tracemalloc peaks (separate untimed runs, Python heap only): "
            + ", ".join(f"{k} {v:.1f} MB" for k, v in traced.items()))
    for impl, rs in results.items():
        case.records.append(aggregate(impl, case, rs, common, traced[impl]))
        # The timeline of the run with the median time.
        mid = sorted(rs, key=lambda x: x.data["seconds"])[len(rs) // 2]
        case.timelines[impl] = mid.run.timeline
    case.targets = evaluate_targets(case)
    for rec in case.records:
        if rec["implementation"] == "native":
            rec["targets"] = case.targets
        if rec["implementation"] in IMPLEMENTATIONS and case.bit_exact is not None:
            rec["bit_exact"] = case.bit_exact
    for p in outputs.values():
        shutil.rmtree(p, ignore_errors=True)


# --- report ---------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_report(cases: Sequence[Case], skipped: Sequence[str], meta: dict) -> str:
    lines = ["ArrowQuant memory benchmark", "=" * 27, ""]
    m = meta["machine"]
    lines += [f"Date:     {meta['timestamp']}",
              f"Commit:   {meta['commit']}",
              f"Machine:  {m['cpu']}, {m['cpu_count']} cores, {m['memory_gb']} GB RAM, {m['platform']}",
              f"Load:     1-min load average {m.get('load_average_1m')} at start (above {m['cpu_count']} "
              f"cores means other work competed for the CPU: times are then pessimistic)",
              f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
              f"Settings: group size {meta.get('group_size', GROUP_SIZE)}, asymmetric, method {meta.get('method', 'mse')} with "
              f"{meta.get('param_dtype', 'float16')} parameters, threads {meta['threads'] or 'all'}, "
              f"repeat {meta['repeat']} (time = median, memory = max over repeats)",
              "",
              "Peak = true peak RSS of the job's process (os.wait4 ru_maxrss). Baseline = RSS after",
              "imports. Quantization memory = peak - baseline. tracemalloc = Python heap only",
              "(numpy buffers included, the engine's C++ allocations not), from a separate untimed",
              "run. Pure I/O reads the input and writes an output of the native output's size once.",
              "Inputs are in the page cache.",
              ""]
    header = (f"  {'implementation':<15}{'peak MB':>10}{'baseline MB':>13}{'quant. MB':>11}{'time s':>10}"
              f"{'Mparams/s':>11}{'MB/s':>9}{'tracemalloc MB':>16}")
    for case in cases:
        params = case.records[0]["params"] if case.records else 0
        lines.append(f"{case.size} ({params / 1e6:.1f}M params), {case.bits}-bit, input {case.fmt}")
        lines.append(header)
        for r in case.records:
            name = "pure I/O" if r["implementation"] == IO_JOB else r["implementation"]
            lines.append(f"  {name:<15}{r['peak_memory_mb']:>10.1f}{r['baseline_memory_mb']:>13.1f}"
                         f"{r['quantization_memory_mb']:>11.1f}{r['quantization_time_s']:>10.3f}"
                         f"{_fmt(r['throughput_mparams_s'], '.1f'):>11}{_fmt(r['throughput_mb_s'], '.0f'):>9}"
                         f"{_fmt(r['tracemalloc_peak_mb_python_heap_only'], '.1f'):>16}")
        t = case.targets
        if "memory_ratio" in t:
            lines.append(f"  memory ratio native/reference: {_fmt(t['memory_ratio']['value'], '.3f')}"
                         f"  (target {t['memory_ratio']['target']})  [{t['memory_ratio']['mark']}]")
            lines.append(f"  speedup reference/native:      {t['speedup']['value']:.1f}x"
                         f"  (target {t['speedup']['target']})  [{t['speedup']['mark']}]")
            lines.append(f"  outputs bit-exact:             {case.bit_exact}  [{t['bit_exact']['mark']}]"
                         + (f"  differing: {', '.join(case.mismatches)}" if case.mismatches else ""))
        if "io_bound" in t:
            lines.append(f"  native time / pure I/O time:   {t['io_bound']['value']:.2f}x"
                         f"  (target {t['io_bound']['target']})  [{t['io_bound']['mark']}]")
        if "time" in t:
            lines.append(f"  native end-to-end time:        {t['time']['value']:.2f} s"
                         f"  (target {t['time']['target']})  [{t['time']['mark']}]")
        lines.append("")
    for case in cases:
        for r in case.records:
            if "parent_rss_mb" in r and r["parent_rss_mb"] >= r["baseline_memory_mb"]:
                lines.append(f"WARNING: {case.size} {r['implementation']}: the parent's RSS "
                             f"({r['parent_rss_mb']:.0f} MB) reached the child's baseline; its peak may be "
                             "overstated (Linux carries the parent's peak into a child's ru_maxrss).")
    for s in skipped:
        lines.append(f"SKIPPED: {s}")
    marks = [t["mark"] for c in cases for t in c.targets.values()]
    # Worded unlike a test runner's summary: these are performance targets.
    lines.append(f"Targets met: {marks.count(bc.PASS)} of {len(marks)} "
                 f"({marks.count(bc.FAIL)} missed, "
                 f"{len(marks) - marks.count(bc.PASS) - marks.count(bc.FAIL)} not applicable).")
    return "\n".join(lines) + "\n"


def load_cases(out_dir: Path) -> List[Case]:
    """Cases rebuilt from a finished run's JSON files (to redraw its charts)."""
    records = json.loads((out_dir / "memory_benchmark_results.json").read_text())
    cases: Dict[Tuple[str, int, str], Case] = {}
    for r in records:
        key = (r["model_size"], r["bit_width"], r["input_format"])
        case = cases.setdefault(key, Case(size=r["model_size"], fmt=r["input_format"], bits=r["bit_width"]))
        case.records.append(r)
        if "targets" in r:
            case.targets = r["targets"]
        if "bit_exact" in r:
            case.bit_exact = r["bit_exact"]
    timeline = out_dir / "memory_timeline.json"
    if timeline.exists():
        for t in json.loads(timeline.read_text()):
            key = (t["model_size"], t["bit_width"], t["input_format"])
            if key in cases:
                cases[key].timelines[t["implementation"]] = [(a, b) for a, b in t["samples"]]
    return list(cases.values())


def format_markdown(cases: Sequence[Case]) -> str:
    """Per case: the measured figures and each target with its mark, as one markdown table."""
    lines = ["| size | bits | input | native peak / quant. MB | reference peak / quant. MB | ratio (<= 0.25) "
             "| native s | reference s | speedup (>= 10x) | pure I/O s | native / I/O (<= 1.5x) "
             "| time target | bit-exact |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in cases:
        by = {r["implementation"]: r for r in c.records}
        t = c.targets

        def mem(impl: str) -> str:
            r = by.get(impl)
            return "-" if r is None else f"{r['peak_memory_mb']:.0f} / {r['quantization_memory_mb']:.0f}"

        def secs(impl: str) -> str:
            r = by.get(impl)
            return "-" if r is None else f"{r['quantization_time_s']:.2f}"

        def target(name: str, spec: str, unit: str = "") -> str:
            if name not in t or t[name]["value"] is None:
                return "-"
            return f"{format(t[name]['value'], spec)}{unit} {t[name]['mark']}"

        time_t = (f"< {bc.TIME_TARGETS_S[c.size]:g} s: {t['time']['mark']}" if "time" in t else "-")
        exact = "-" if c.bit_exact is None else ("yes" if c.bit_exact else "NO")
        lines.append(f"| {c.size} | {c.bits} | {c.fmt} | {mem('native')} | {mem('reference')} "
                     f"| {target('memory_ratio', '.3f')} | {secs('native')} | {secs('reference')} "
                     f"| {target('speedup', '.1f', 'x')} | {secs(IO_JOB)} "
                     f"| {target('io_bound', '.2f', 'x')} | {time_t} | {exact} |")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", action="append", choices=SIZES, dest="sizes",
                   help="size class to run (repeatable); 10M is the small size for CI")
    p.add_argument("--all", action="store_true", help=f"run {', '.join(ALL_SIZES)}")
    p.add_argument("--bit-width", action="append", type=int, choices=(2, 4, 8), dest="bits",
                   help="bit width (repeatable, default 4)")
    p.add_argument("--skip-python", action="store_true",
                   help="skip the numpy reference (no ratio, speedup or bit-exact check)")
    p.add_argument("--generate-charts", action="store_true", help="write PNG charts (matplotlib)")
    p.add_argument("--output-dir", type=Path, default=Path(".benchmarks/memory"))
    p.add_argument("--models-dir", type=Path, default=Path(".benchmarks/models"),
                   help="where generated models are cached between runs")
    p.add_argument("--repeat", type=int, default=1, help="runs per job (median time, max memory)")
    p.add_argument("--keep-models", action="store_true",
                   help=f"keep generated models over {CACHE_LIMIT_BYTES >> 30} GiB (smaller ones are always kept)")
    p.add_argument("--input-format", choices=FORMATS + ("both",), default="parquet")
    p.add_argument("--threads", type=int, default=0, help="engine threads (0 = all cores)")
    p.add_argument("--method", choices=("mse", "rtn"), default="mse",
                   help="scale search (default mse, the tool's default; rtn = plain min/max)")
    p.add_argument("--param-dtype", choices=("float16", "float32", "superblock"), default="float16",
                   help="storage of scales and zero points (default float16, the tool's default; "
                        "superblock: two-level, docs/FORMAT.md section 9)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE,
                   help=f"group size (default {GROUP_SIZE}, the tool's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tracemalloc", action="store_true",
                   help="skip the extra untimed run per job that measures the Python heap with tracemalloc")
    args = p.parse_args(argv)
    if args.all:
        args.sizes = list(dict.fromkeys((args.sizes or []) + list(ALL_SIZES)))
    if not args.sizes:
        p.error("give --model-size (repeatable) or --all")
    args.bits = sorted(set(args.bits or [4]))
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    if argv[:1] == ["--markdown-from"]:
        sys.stdout.write(format_markdown(load_cases(Path(argv[1]))))
        return 0
    if argv[:1] == ["--charts-from"]:
        import charts

        for path in charts.write_all(load_cases(Path(argv[1])), Path(argv[1])):
            print(f"chart: {path}")
        return 0
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = list(FORMATS) if args.input_format == "both" else [args.input_format]
    meta = {"timestamp": bc.timestamp(), "commit": bc.git_commit(), "machine": bc.machine_info(),
            "versions": bc.package_versions(), "threads": args.threads, "repeat": args.repeat,
            "method": args.method, "param_dtype": args.param_dtype, "group_size": args.group_size}
    cases: List[Case] = []
    skipped: List[str] = []
    failed = False
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out_dir))
    generated: List[Path] = []
    try:
        info = run_job("info", {"sizes": args.sizes, "formats": formats, "models_dir": str(args.models_dir),
                                "seed": args.seed}, work).data
        for size in args.sizes:
            params, model_bytes, cached = info[size]["params"], info[size]["bytes"], info[size]["cached"]
            dirs = {fmt: args.models_dir / model_dir_name(size, fmt, args.seed) for fmt in formats}
            need = disk_needed(model_bytes, cached, params, args.bits, len(formats))
            ok, free = check_disk(args.models_dir, need)
            if ok and args.models_dir.resolve() != out_dir.resolve():
                ok, free = check_disk(out_dir, 3 * estimate_quantized_bytes(params, max(args.bits)))
            if not ok:
                msg = (f"{size}: not enough free disk space: needs about {need / 1e9:.1f} GB "
                       f"(model {model_bytes / 1e9:.1f} GB per format, plus outputs), "
                       f"{free / 1e9:.1f} GB free under {args.models_dir}. Free space or point "
                       f"--models-dir/--output-dir at a larger disk.")
                log("SKIPPED " + msg)
                skipped.append(msg)
                continue
            for fmt in formats:
                log(f"{size} ({params / 1e6:.1f}M params) as {fmt}: generating or reusing {dirs[fmt]}")
                g = run_job("generate", {"model_dir": str(dirs[fmt]), "size": size, "format": fmt,
                                         "seed": args.seed}, work)
                if not g.data["was_cached"]:
                    generated.append(dirs[fmt])
                    log(f"  generated in {g.data['seconds']:.1f} s, peak RSS {g.run.peak_rss_mb:.0f} MB "
                        f"for {g.data['bytes'] / 1e6:.0f} MB of model")
                versions = dict(meta["versions"])
                common = {"params": params, "model_bytes": g.data["bytes"], "threads": args.threads,
                          "method": args.method, "param_dtype": args.param_dtype,
                          "group_size": args.group_size, "machine": meta["machine"], "commit": meta["commit"], "versions": versions}
                for bits in args.bits:
                    log(f"  {bits}-bit:")
                    case = Case(size=size, fmt=fmt, bits=bits)
                    try:
                        run_case(case, dirs[fmt], work, args, common, log)
                    except JobError as exc:
                        log(f"  FAILED: {exc}")
                        skipped.append(f"{size} {bits}-bit {fmt}: job failed: {exc}")
                        failed = True
                        continue
                    if case.bit_exact is False:
                        failed = True
                    cases.append(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for d in generated:
            if not args.keep_models and d.exists() and sum(
                    p.stat().st_size for p in d.iterdir()) > CACHE_LIMIT_BYTES:
                shutil.rmtree(d, ignore_errors=True)
                log(f"removed generated model {d} (use --keep-models to cache it)")

    records = [r for c in cases for r in c.records]
    report = format_report(cases, skipped, meta)
    (out_dir / "memory_benchmark_report.txt").write_text(report)
    (out_dir / "memory_benchmark_report.md").write_text(format_markdown(cases))
    bc.write_json(out_dir / "memory_benchmark_results.json", records)
    bc.write_json(out_dir / "memory_timeline.json", [
        {"model_size": c.size, "bit_width": c.bits, "input_format": c.fmt, "implementation": impl,
         "samples": [[round(t, 3), round(m, 1)] for t, m in tl]}
        for c in cases for impl, tl in c.timelines.items()])
    print()
    print(report, end="")
    if args.generate_charts and cases:
        import charts

        for path in charts.write_all(cases, out_dir):
            log(f"chart: {path}")
    log(f"results: {out_dir / 'memory_benchmark_results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
