"""--executor ray against the plain run on this machine (benches/README.md,
section "Ray"): the 600M synthetic model quantized by the plain run, by Ray
with 1 worker (one task at a time, all cores) and with 2 workers (two tasks,
one core each), alternating, each run a fresh driver process; wall and CPU
time, driver and worker peak RSS, the per-unit overhead measured in the run,
a no-op task's cost, and the per-core throughput of each method (engine only,
one thread, CPU time). The outputs of all runs are checked byte-identical.

    PYTHONPATH=python python benches/ray_benchmark.py --rounds 3 \\
        --json benches/results/ray/ray_benchmark.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

CONFIGS = {  # name: (executor, ray CPUs per task)
    "plain": ("local", 0),
    "ray-1-worker": ("ray", 2),
    "ray-2-workers": ("ray", 1),
}
METHODS = {"rtn": dict(method="rtn", param_dtype="float16"),
           "mse": dict(method="mse", param_dtype="float16"),
           "superblock": dict(method="mse", param_dtype="superblock", group_size=32)}


def load() -> float:
    return os.getloadavg()[0]


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def one(args: argparse.Namespace) -> None:
    """One run in this (fresh) process; prints its measurements as JSON."""
    import arrowquant as aq

    executor, cpus = CONFIGS[args.one]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    s = aq.quantize(args.model, out, progress=False, executor=executor,
                    ray_address=args.address, ray_cpus_per_task=cpus, **METHODS[args.method])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256()
    for p in sorted(out.glob("*.parquet")) + sorted(out.glob("*.index.json")):
        digest.update(p.read_bytes())
    result: Dict[str, Any] = {
        "config": args.one, "wall_s": wall, "driver_user_s": r1.ru_utime - r0.ru_utime,
        "driver_sys_s": r1.ru_stime - r0.ru_stime, "driver_peak_rss": peak_rss(),
        "output_sha256": digest.hexdigest(), "load": load()}
    ray = s.details.get("ray")
    if ray:
        stats = ray["unit_stats"]
        span = max(u["received"] for u in stats) - min(u["submitted"] for u in stats)
        busy = sum(u["task_seconds"] for u in stats)
        result.update({
            "units": len(stats), "slots": ray["slots"], "cpus_per_task": ray["cpus_per_task"],
            "unit_phase_s": span, "task_busy_s": busy,
            "worker_cpu_s": sum(u["task_cpu_seconds"] for u in stats),
            # Slot time the tasks did not fill: scheduling, transfers, worker start,
            # the driver's staging and writing, per unit.
            "overhead_per_unit_ms": 1000 * (span * ray["slots"] - busy) / len(stats),
            "worker_peak_rss": max(w["peak_rss"] for w in ray["workers"].values()),
            "workers": len(ray["workers"]),
            "unit_bytes_median": statistics.median(u["bytes"] for u in stats),
            # One host, one clock: from submission to the task's start (queueing,
            # a worker's start), from its end to the driver having the result.
            "start_latency_ms_median": 1000 * statistics.median(
                u["started"] - u["submitted"] for u in stats),
            "return_latency_ms_median": 1000 * statistics.median(
                u["received"] - u["ended"] for u in stats),
        })
    print(json.dumps(result))


def noop_overhead(rounds: int = 3, n: int = 200) -> Dict[str, float]:
    """A no-op task on this cluster: round trip one at a time, and the cost
    per task of n tasks kept in flight on 2 slots."""
    import ray

    @ray.remote(num_cpus=1)
    def noop(x: int) -> int:
        return x

    ray.get([noop.remote(i) for i in range(8)])  # workers started
    trip, flow = [], []
    for _ in range(rounds):
        t = []
        for i in range(50):
            t0 = time.perf_counter()
            ray.get(noop.remote(i))
            t.append(time.perf_counter() - t0)
        trip.append(statistics.median(t))
        t0 = time.perf_counter()
        ray.get([noop.remote(i) for i in range(n)])
        flow.append((time.perf_counter() - t0) / n)
    return {"noop_round_trip_ms": 1000 * statistics.median(trip),
            "noop_per_task_in_flight_ms": 1000 * statistics.median(flow)}


def per_core_throughput(model: Path, rounds: int) -> Dict[str, Dict[str, float]]:
    """Engine-only MB/s of source per CPU second on one thread, per method,
    over one transformer layer of the model (7 matrices, ~44 MB float16)."""
    from arrowquant.engine.chunk import ChunkBuffers, ChunkQuantizer
    from arrowquant.sources import open_model
    from arrowquant.spec import (QuantSpec, groups_per_row, packed_row_bytes,
                                 superblocks_per_row)
    import numpy as np

    out: Dict[str, Dict[str, float]] = {}
    q = ChunkQuantizer("native", 1)
    with open_model(model) as src:
        layer = [t for t in src.tensors if t.name.startswith("model.layers.3.") and t.rows > 1]
        data = [(t, src.read(t.name)) for t in layer]
        nbytes = sum(raw.size for _, raw in data)
        for name, m in METHODS.items():
            g = m.get("group_size", 128)
            spec = QuantSpec(4, g, "asymmetric", m["method"], m["param_dtype"])
            cpu = []
            for _ in range(rounds):
                c0 = time.process_time()
                for t, raw in data:
                    G, sb = groups_per_row(t.cols, g), m["param_dtype"] == "superblock"
                    S = superblocks_per_row(t.cols, g) if sb else 0
                    f32 = lambda n: np.empty(n, np.float32)  # noqa: E731
                    bufs = ChunkBuffers(
                        np.empty(t.rows * packed_row_bytes(t.cols, 4), np.uint8),
                        f32(t.rows * G), f32(t.rows * G),
                        f32(t.rows * S) if sb else None, f32(t.rows * S) if sb else None,
                        np.empty(t.rows * G, np.uint8) if sb else None,
                        np.empty(t.rows * G, np.uint8) if sb else None)
                    q.quantize_rows(t.name, raw, t.dtype, t.rows, t.cols, spec, bufs,
                                    importance=None, equalization=None, row_offset=0)
                cpu.append(time.process_time() - c0)
            out[name] = {"bytes": nbytes, "cpu_s": statistics.median(cpu),
                         "mb_per_cpu_s": nbytes / 1e6 / statistics.median(cpu)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/arrowquant-ray-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", choices=list(METHODS), default="mse")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    import ray
    from arrowquant.synthetic import generate_model

    model = generate_model(args.models_dir / "600M-safetensors", "600M", fmt="safetensors")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    runs: List[Dict[str, Any]] = []
    for rnd in range(args.rounds):
        for name in CONFIGS:
            cmd = [sys.executable, __file__, "--one", name, "--model", str(model), "--out",
                   str(args.models_dir / "out"), "--address", address, "--method", args.method]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name}: {r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["round"] = rnd
            runs.append(res)
            print(f"round {rnd} {name}: {res['wall_s']:.1f} s (load {res['load']:.1f})",
                  flush=True)
    noop = noop_overhead()
    ray.shutdown()
    cores = per_core_throughput(model, args.rounds)
    digests = {r["output_sha256"] for r in runs}
    summary: Dict[str, Any] = {"model": "600M safetensors float16", "method": args.method,
                               "identical_outputs": len(digests) == 1, "noop": noop,
                               "per_core": cores, "configs": {}}
    keys = ["wall_s", "driver_user_s", "driver_sys_s", "driver_peak_rss", "worker_peak_rss",
            "worker_cpu_s", "overhead_per_unit_ms", "start_latency_ms_median",
            "return_latency_ms_median", "units", "slots", "load"]
    for name in CONFIGS:
        rs = [r for r in runs if r["config"] == name]
        summary["configs"][name] = {k: statistics.median(r[k] for r in rs) for k in keys
                                    if k in rs[0]}
    summary["runs"] = runs
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
