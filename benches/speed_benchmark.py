#!/usr/bin/env python3
"""Quantization throughput: C++ engine vs numpy reference vs the `gguf` package.

Kernel runs quantize one in-memory matrix (no I/O) per bit width, input dtype
and thread count. The `gguf` runs are PyPI gguf's numpy quantizers the way a
user of that tool runs them (gguf.quants.quantize on float32, so a float16
weight is converted first and the conversion is timed): Q8_0 against the
engine's symmetric INT8 with group size 32, Q4_0 against symmetric INT4 g32
(the same block layout: one scale per 32 weights). End-to-end runs quantize a
synthetic model file with arrowquant.quantize, engine="native" vs
"reference". All contenders run in the same process, alternating, and each
figure is the median of --runs timings after one warm-up.

    python benches/speed_benchmark.py                 # defaults below
    python benches/speed_benchmark.py --quick         # a fast smoke run
    python benches/speed_benchmark.py --e2e-size 100M --bit-width 4 --threads 1 --threads 0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def timed_median(fns: Dict[str, Callable[[], object]], runs: int, min_time: float = 0.0) -> Dict[str, dict]:
    """Runs each callable once to warm up, then `runs` timings alternating the
    order between rounds; returns the median seconds per call for each name.

    A timing repeats a fast callable until it spans `min_time` seconds, so that
    scheduler noise on a shared machine does not dominate millisecond calls."""
    import math

    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    inner: Dict[str, int] = {}
    for n, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        inner[n] = max(1, math.ceil(min_time / warm)) if warm > 0 else 1
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            for _ in range(inner[n]):
                fns[n]()
            times[n].append((time.perf_counter() - t0) / inner[n])
    return {n: {"median_s": bc.median(ts), "runs_s": [round(t, 6) for t in ts], "calls_per_run": inner[n]}
            for n, ts in times.items()}


def make_matrix(rows: int, cols: int, dtype: str, seed: int = 0):
    import numpy as np

    from arrowquant.synthetic import tensor_blocks

    x = np.concatenate(list(tensor_blocks("speed.weight", (rows, cols), seed, dtype)))
    return np.ascontiguousarray(x)


def kernel_benchmark(args, log) -> List[dict]:
    import numpy as np

    from arrowquant import engine, reference

    rows, cols = args.rows, args.cols
    params = rows * cols
    out: List[dict] = []
    for dtype in args.dtypes:
        x = make_matrix(rows, cols, dtype)
        for bits in args.bits:
            fns: Dict[str, Callable[[], object]] = {}
            for th in args.threads:
                fns[f"engine t={th or os.cpu_count()}"] = (
                    lambda th=th: engine.quantize_array(x, bits=bits, group_size=args.group_size, threads=th))
            fns["reference"] = lambda: reference.quantize_array(x, bits=bits, group_size=args.group_size)
            res = timed_median(fns, args.runs, args.min_time)
            ref_t = res["reference"]["median_s"]
            for name, r in res.items():
                row = {"kind": "kernel", "contender": name, "dtype": dtype, "bit_width": bits,
                       "group_size": args.group_size, "scheme": "asymmetric", "params": params,
                       "median_s": round(r["median_s"], 5), "runs_s": r["runs_s"],
                       "mparams_s": round(params / r["median_s"] / 1e6, 1),
                       "input_mb_s": round(x.nbytes / r["median_s"] / bc.MB, 1)}
                if name != "reference":
                    row["speedup_vs_reference"] = round(ref_t / r["median_s"], 1)
                out.append(row)
                log(_row_line(row))
    # Same arithmetic contract: check once that the engine and reference agree bit for bit.
    x = make_matrix(min(rows, 256), cols, "float16")
    a = engine.quantize_array(x, bits=4, group_size=args.group_size)
    b = reference.quantize_array(x, bits=4, group_size=args.group_size)
    same = bool(np.array_equal(a.data, b.data) and np.array_equal(a.scales, b.scales)
                and np.array_equal(a.zero_points, b.zero_points))
    log(f"engine == reference (bit for bit, 4-bit float16 sample): {same}")
    out.append({"kind": "check", "contender": "engine vs reference", "bit_exact": same})
    return out


def gguf_benchmark(args, log) -> List[dict]:
    import numpy as np

    from arrowquant import engine

    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quantize
    except ImportError:
        log("gguf not installed: skipping the gguf comparison (pip install gguf)")
        return []
    rows, cols = args.rows, args.cols
    params = rows * cols
    x = make_matrix(rows, cols, "float16")
    x32 = x.astype(np.float32)
    out: List[dict] = []
    th = args.threads[-1]
    for qtype, bits in ((GGMLQuantizationType.Q8_0, 8), (GGMLQuantizationType.Q4_0, 4)):
        fns = {
            f"gguf {qtype.name} (numpy)": lambda q=qtype: quantize(x.astype(np.float32), q),
            f"engine sym INT{bits} g32 t={th or os.cpu_count()}": lambda b=bits: engine.quantize_array(
                x, bits=b, group_size=32, scheme="symmetric", threads=th),
        }
        res = timed_median(fns, args.runs, args.min_time)
        g_name, e_name = list(fns)
        # Accuracy of each, so the speed comparison is of comparable work.
        g_hat = dequantize(quantize(x32, qtype), qtype)
        e_hat = engine.dequantize_array(engine.quantize_array(x, bits=bits, group_size=32, scheme="symmetric"))
        for name, hat in ((g_name, g_hat), (e_name, e_hat)):
            r = res[name]
            cos = float(np.dot(hat.ravel(), x32.ravel()) / (np.linalg.norm(hat) * np.linalg.norm(x32)))
            row = {"kind": "gguf", "contender": name, "dtype": "float16", "bit_width": bits, "group_size": 32,
                   "scheme": "symmetric", "params": params, "median_s": round(r["median_s"], 5),
                   "runs_s": r["runs_s"], "mparams_s": round(params / r["median_s"] / 1e6, 1),
                   "input_mb_s": round(x.nbytes / r["median_s"] / bc.MB, 1), "cosine": round(cos, 6)}
            if name == e_name:
                row["speedup_vs_gguf"] = round(res[g_name]["median_s"] / r["median_s"], 1)
            out.append(row)
            log(_row_line(row))
    return out


def e2e_benchmark(args, log) -> List[dict]:
    import arrowquant
    from arrowquant import synthetic

    model = synthetic.generate_model(args.models_dir / f"{args.e2e_size}-parquet-seed0", args.e2e_size)
    params = synthetic.count_params(args.e2e_size)
    nbytes = synthetic.model_bytes(args.e2e_size)
    out: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="speed-", dir=args.output_dir) as tmp:
        for bits in args.e2e_bits:
            fns: Dict[str, Callable[[], object]] = {}
            for th in args.threads:
                fns[f"native t={th or os.cpu_count()}"] = lambda th=th: arrowquant.quantize(
                    model, Path(tmp) / f"n{th}", bits=bits, threads=th, overwrite=True)
            if not args.skip_python:
                fns["reference"] = lambda: arrowquant.quantize(model, Path(tmp) / "r", bits=bits,
                                                               engine="reference", overwrite=True)
            res = timed_median(fns, args.e2e_runs)
            ref_t = res.get("reference", {}).get("median_s")
            for name, r in res.items():
                row = {"kind": "end-to-end", "contender": name, "dtype": "float16", "bit_width": bits,
                       "group_size": 128, "scheme": "asymmetric", "model_size": args.e2e_size, "params": params,
                       "median_s": round(r["median_s"], 4), "runs_s": r["runs_s"],
                       "mparams_s": round(params / r["median_s"] / 1e6, 1),
                       "input_mb_s": round(nbytes / r["median_s"] / bc.MB, 1)}
                if ref_t and name != "reference":
                    row["speedup_vs_reference"] = round(ref_t / r["median_s"], 1)
                out.append(row)
                log(_row_line(row))
    return out


def _row_line(r: dict) -> str:
    extra = ""
    if "speedup_vs_reference" in r:
        extra = f"  {r['speedup_vs_reference']:.1f}x vs reference"
    if "speedup_vs_gguf" in r:
        extra = f"  {r['speedup_vs_gguf']:.1f}x vs gguf"
    if "cosine" in r:
        extra += f"  cosine {r['cosine']:.5f}"
    return (f"  {r['kind']:<10} {r['contender']:<30} {r['dtype']:<9} {r['bit_width']}-bit "
            f"{r['median_s']:>9.4f} s {r['mparams_s']:>9.1f} Mparams/s{extra}")


def targets(rows: Sequence[dict]) -> List[str]:
    """Kernel speedup (>= 30x) and end-to-end speedup (>= 10x) of the fastest engine row."""
    lines = []
    kernel = [r for r in rows if r["kind"] == "kernel" and "speedup_vs_reference" in r]
    if kernel:
        best: Dict[tuple, dict] = {}
        for r in kernel:
            k = (r["dtype"], r["bit_width"])
            if k not in best or r["speedup_vs_reference"] > best[k]["speedup_vs_reference"]:
                best[k] = r
        for (dtype, bits), r in sorted(best.items()):
            ok = r["speedup_vs_reference"] >= bc.KERNEL_SPEEDUP_TARGET
            lines.append(f"kernel speedup {dtype} {bits}-bit ({r['contender']}): {r['speedup_vs_reference']:.1f}x "
                         f"(target >= {bc.KERNEL_SPEEDUP_TARGET:g}x) [{bc.mark(ok)}]")
    for r in rows:
        if r["kind"] == "end-to-end" and "speedup_vs_reference" in r:
            ok = r["speedup_vs_reference"] >= bc.SPEEDUP_TARGET
            lines.append(f"end-to-end speedup {r['model_size']} {r['bit_width']}-bit ({r['contender']}): "
                         f"{r['speedup_vs_reference']:.1f}x (target >= {bc.SPEEDUP_TARGET:g}x) [{bc.mark(ok)}]")
    return lines


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| kind | contender | dtype | bits | g | median s | M params/s | speedup | cosine |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "check":
            continue
        sp = r.get("speedup_vs_reference", r.get("speedup_vs_gguf"))
        lines.append(f"| {r['kind']} | {r['contender']} | {r['dtype']} | {r['bit_width']} | {r['group_size']} "
                     f"| {r['median_s']:.4f} | {r['mparams_s']:.1f} | {'' if sp is None else f'{sp:.1f}x'} "
                     f"| {r.get('cosine', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bit-width", type=int, action="append", choices=(2, 4, 8), dest="bits",
                   help="kernel bit widths (repeatable; default 2, 4, 8)")
    p.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32"), dest="dtypes",
                   help="kernel input dtypes (repeatable; default float16, bfloat16, float32)")
    p.add_argument("--threads", type=int, action="append",
                   help="engine thread counts (repeatable; 0 = all cores; default 1 and 0)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs per kernel contender (median)")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="a kernel timing repeats the call until it spans this many seconds (default 0.2)")
    p.add_argument("--e2e-size", default="100M", help="synthetic model for end-to-end runs (default 100M)")
    p.add_argument("--e2e-bits", type=int, action="append", choices=(2, 4, 8),
                   help="end-to-end bit widths (repeatable; default 4)")
    p.add_argument("--e2e-runs", type=int, default=3)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-gguf", action="store_true")
    p.add_argument("--skip-python", action="store_true", help="no end-to-end reference run")
    p.add_argument("--quick", action="store_true",
                   help="1024x4096 matrix, float16 only, 3 runs, 10M end to end")
    p.add_argument("--output-dir", type=Path, default=Path(".benchmarks/speed"))
    p.add_argument("--models-dir", type=Path, default=Path(".benchmarks/models"))
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.runs, args.e2e_runs, args.e2e_size = 1024, 3, 2, "10M"
        args.dtypes = args.dtypes or ["float16"]
    args.bits = sorted(set(args.bits or [2, 4, 8]))
    args.dtypes = args.dtypes or ["float16", "bfloat16", "float32"]
    args.threads = list(dict.fromkeys(args.threads or [1, 0]))
    args.e2e_bits = sorted(set(args.e2e_bits or [4]))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    bc.use_source_tree()
    import arrowquant

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"ArrowQuant speed benchmark: {bc.cpu_model()}, {os.cpu_count()} cores, "
        f"kernel {arrowquant.active_kernel()}, commit {bc.git_commit()}, load average {bc.load_average()}")
    log(f"kernel: {args.rows}x{args.cols} matrix, group size {args.group_size}, median of {args.runs} runs")
    rows = kernel_benchmark(args, log)
    if not args.skip_gguf:
        log(f"gguf comparison: {args.rows}x{args.cols} float16, group/block size 32")
        rows += gguf_benchmark(args, log)
    if not args.skip_e2e:
        log(f"end to end: {args.e2e_size} synthetic model (Parquet V1), median of {args.e2e_runs} runs")
        rows += e2e_benchmark(args, log)
    measured = [r for r in rows if r["kind"] != "check"]
    log("")
    for line in targets(measured):
        log(line)
    if args.markdown:
        log("")
        log(markdown_table(measured))
    meta = {"timestamp": bc.timestamp(), "commit": bc.git_commit(), "machine": bc.machine_info(),
            "versions": dict(bc.package_versions(), arrowquant=arrowquant.__version__,
                             kernel=arrowquant.active_kernel())}
    bc.write_json(args.output_dir / "speed_results.json", {"meta": meta, "results": rows})
    log(f"results: {args.output_dir / 'speed_results.json'}")
    exact = [r for r in rows if r["kind"] == "check"]
    return 0 if all(r["bit_exact"] for r in exact) else 1


if __name__ == "__main__":
    sys.exit(main())
