#!/usr/bin/env python3
"""What CI can check cheaply at 100M besides the memory benchmark's gate:
`--max-memory` as a promise about the process, and the page faults a run
takes per GB of input.

    python benches/promise_benchmark.py --model-size 100M --max-memory 64MiB \\
        --baseline benches/baselines/ci_promise.json [--json out.json]

Each case (input format x settings) runs `arrowquant.quantize` in a fresh
process that measures itself: its RSS and minor page faults after importing
numpy, pyarrow.parquet and arrowquant, then its VmHWM (the true peak RSS; a
child's ru_maxrss would start at its parent's RSS) and minor faults at the
end. Checked per case:

- quantization memory = VmHWM - RSS after imports <= --max-memory;
- minor faults after imports per GB of input <= the baseline's
  `max_faults_per_gb` (the 2026-12 pipeline took ~210,000 per GB at 600M:
  every read unit and output buffer landed in fresh pages).

Parquet V1 input is measured and reported but not gated (`--gate-format`):
its reader holds a whole tensor cell, decoded by pyarrow into fresh
buffers (2-3x the cell at its peak, ~270,000 faults per GB), until V1 cells
are read in slices.

Exit status 1 when a check of a gated format fails. Models are the memory benchmark's
(`arrowquant.synthetic.generate_model`, cached in --models-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
import numpy, pyarrow.parquet, arrowquant
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base, faults = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
arrowquant.quantize(sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[3]))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"base_mb": base, "peak_mb": status("VmHWM"),
                  "minor_faults": ru.ru_minflt - faults, "user_s": ru.ru_utime,
                  "sys_s": ru.ru_stime}))
"""

# Every width and parameter storage the promise covers, cheap at 100M.
CASES: List[Dict[str, object]] = [
    {"bits": 4},                                                    # the INT4 defaults
    {"bits": 8, "method": "rtn", "param_dtype": "float32"},
    {"bits": 4, "method": "rtn", "param_dtype": "superblock", "group_size": 32},
]


def _python_path() -> str:
    """The source tree when its extension is built in place, else installed."""
    src = ROOT / "python"
    return str(src) if any((src / "arrowquant").glob("_core*.so")) else ""


def run_case(model: Path, kwargs: Dict[str, object], env: Dict[str, str]) -> Dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="aq-promise-"))
    try:
        got = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out / "out"),
                              json.dumps(kwargs)], env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if got.returncode != 0:
        raise RuntimeError(f"{model} {kwargs}: quantize failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="100M")
    p.add_argument("--max-memory", default="64MiB")
    p.add_argument("--input-format", choices=("parquet", "safetensors", "both"), default="both")
    p.add_argument("--models-dir", type=Path, default=Path(".benchmarks/models"))
    p.add_argument("--baseline", type=Path, help="JSON with max_faults_per_gb")
    p.add_argument("--json", type=Path, help="write the records here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-format", action="append", dest="gated", default=None,
                   help="input formats whose failures fail the run (default: safetensors)")
    args = p.parse_args(argv)
    if _python_path():  # else the installed package (an unbuilt source tree cannot import)
        sys.path.insert(0, _python_path())
    from arrowquant.sizes import parse_size
    from arrowquant.synthetic import generate_model

    budget_mb = parse_size(args.max_memory, "max memory") / 2**20
    limit = None
    if args.baseline:
        limit = float(json.loads(args.baseline.read_text())["max_faults_per_gb"])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if _python_path():
        env["PYTHONPATH"] = _python_path()
    formats = ("parquet", "safetensors") if args.input_format == "both" else (args.input_format,)
    gated = set(args.gated or ["safetensors"])
    records, failed = [], False
    print(f"| input | settings | quant. MB (<= {budget_mb:.0f}) | faults / GB"
          f"{f' (<= {limit:.0f})' if limit else ''} | user s | sys s | status |")
    print("|---|---|---:|---:|---:|---:|---|")
    for fmt in formats:
        model = generate_model(args.models_dir / f"{args.model_size}-{fmt}-seed{args.seed}",
                               args.model_size, fmt=fmt, seed=args.seed)
        in_gb = sum(f.stat().st_size for f in model.iterdir()
                    if f.suffix in (".parquet", ".safetensors")) / 1e9
        for case in CASES:
            kwargs = {**case, "max_memory": args.max_memory}
            m = run_case(model, kwargs, env)
            quant = m["peak_mb"] - m["base_mb"]
            per_gb = m["minor_faults"] / in_gb
            ok = quant <= budget_mb and (limit is None or per_gb <= limit)
            failed |= not ok and fmt in gated
            settings = " ".join(f"{k}={v}" for k, v in case.items())
            mark = ("PASS" if ok else "FAIL") if fmt in gated else \
                f"reported ({'within' if ok else 'over'})"
            print(f"| {fmt} | {settings} | {quant:.1f} | {per_gb:,.0f} | {m['user_s']:.2f} | "
                  f"{m['sys_s']:.2f} | {mark} |")
            records.append({"input_format": fmt, "model_size": args.model_size, **m,
                            "settings": case, "max_memory_mb": budget_mb,
                            "quantization_memory_mb": quant, "input_gb": in_gb,
                            "faults_per_gb": per_gb, "pass": ok, "gated": fmt in gated})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
