#!/usr/bin/env python3
"""Two builds of ArrowQuant, same jobs, same run: wall, user and system CPU,
page faults and peak RSS of `arrowquant quantize`, each job in a fresh process
(os.wait4), the builds alternating, medians and ratios.

    python benches/ab_benchmark.py --a /path/to/old/python --b python \\
        --model-size 100M --model-size 600M --rounds 3 -- --bits 4

--a / --b are directories put first on PYTHONPATH (a source tree's python/
folder with its extension built in place: `make dev`). Everything after `--`
is passed to `arrowquant quantize`. Synthetic models (SafeTensors, float16)
are generated once under --models-dir by build B.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence


def run_once(pythonpath: Path, model: Path, extra: Sequence[str], out_root: Path) -> Dict[str, float]:
    """One quantize in a fresh process; its resources from wait4."""
    out = Path(tempfile.mkdtemp(dir=out_root)) / "out"
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-c", "import sys; from arrowquant.cli import main; sys.exit(main())",
           "quantize", str(model), str(out), "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    shutil.rmtree(out.parent, ignore_errors=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{pythonpath}: quantize failed: {err[-2000:]}")
    return {"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "minor_faults": float(ru.ru_minflt), "peak_rss_mb": ru.ru_maxrss / 1024.0}


def main(argv: Sequence[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="PYTHONPATH of build A (baseline)")
    p.add_argument("--b", type=Path, required=True, help="PYTHONPATH of build B")
    p.add_argument("--model-size", action="append", dest="sizes", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models-dir", type=Path, default=Path(".benchmarks/models"))
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    sizes = args.sizes or ["100M"]
    env = {**os.environ, "PYTHONPATH": str(args.b), "PYTHONWARNINGS": "ignore"}
    models = {}
    for size in sizes:
        d = args.models_dir / f"ab-{size}-safetensors"
        subprocess.run([sys.executable, "-c",
                        "import sys; from arrowquant.synthetic import generate_model; "
                        "generate_model(sys.argv[1], size=sys.argv[2], fmt='safetensors')",
                        str(d), size], env=env, check=True)
        models[size] = d
    out_root = Path(tempfile.mkdtemp(prefix="aq-ab-"))
    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    try:
        for size, model in models.items():
            per = results.setdefault(size, {"a": [], "b": []})
            for r in range(args.rounds):
                order = ("a", "b") if r % 2 == 0 else ("b", "a")  # alternate who goes first
                for which in order:
                    per[which].append(run_once(getattr(args, which), model, extra, out_root))
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    summary = {}
    print(f"quantize {' '.join(extra) or '(defaults)'}; medians of {args.rounds}; "
          f"A = {args.a}, B = {args.b}")
    print(f"| model | metric | A | B | B / A |\n|---|---|---:|---:|---:|")
    for size, per in results.items():
        summary[size] = {}
        for key in ("wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mb"):
            a = statistics.median(x[key] for x in per["a"])
            b = statistics.median(x[key] for x in per["b"])
            summary[size][key] = {"a": a, "b": b, "ratio": b / a if a else None}
            print(f"| {size} | {key} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": extra, "rounds": args.rounds,
                                         "summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
