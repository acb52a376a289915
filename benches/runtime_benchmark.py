"""Quantized models in PyTorch: speed and memory of the arrowquant runtime.

Sections (all in one run, every comparison alternating in the same process,
medians over rounds; torch and the kernels at 1 and 2 threads):

* ``linear``: Linear 4096x4096 and 4096x11008 (in x out) at batch 1, 4,
  16, 64, 256: float32 / bfloat16 nn.Linear, arrowquant INT8 / INT4
  (QuantLinear, the quantizer's defaults: group 128, mse, float16
  parameters), and the anchors that run on CPU from PyPI: torchao int8 /
  int4 weight-only, optimum-quanto qint8 / qint4, HQQ 8 / 4 bit with its
  torch backend. Anchors that cannot run are listed with the reason.
* ``policy``: the measurements behind arrowquant.runtime.ops.Policy (GEMV
  vs GEMM by batch, C++ GEMM vs torch BLAS on dequantized panels, conv by
  transient dequantization vs unfold + GEMM).
* ``unet``: one denoising step of a UNet2DConditionModel with the
  geometry of Stable Diffusion 1.5 (random weights), float32 vs INT8 vs
  INT4 loaded with arrowquant.diffusers.load_component.
* ``dit``: a DiT-XL/2 transformer block (1152 wide, 16 heads, adaLN-zero).
* ``rss``: end-to-end peak RSS of a pipeline (SD 1.5 geometry) loaded and
  run for two steps, float32 vs INT8 vs INT4, each in a fresh process.

  python benches/runtime_benchmark.py                       # everything (~30-60 min)
  python benches/runtime_benchmark.py --sections linear policy --quick

Writes runtime_benchmark.json, runtime_benchmark.md and runtime_linear.png
into --output-dir (default .benchmarks/runtime).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
_DEV = REPO / "python" / "arrowquant"
if _DEV.is_dir() and any(_DEV.glob("_core*")):
    sys.path.insert(0, str(REPO / "python"))

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import arrowquant as aq  # noqa: E402
import arrowquant.torch as aqt  # noqa: E402
from arrowquant import _core  # noqa: E402
from arrowquant.runtime import ops  # noqa: E402

MB = 1024.0 * 1024.0
Fn = Callable[[], Any]


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "arrowquant": aq.__version__, "cpu": platform.processor() or platform.machine()}
    for mod in ("torchao", "optimum.quanto", "hqq", "diffusers", "transformers"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out[mod] = f"not importable ({type(exc).__name__})"
    try:
        out["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                          if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def time_call(fn: Fn, min_time: float = 0.02) -> float:
    """Seconds per call of fn, averaged over enough calls to last min_time."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    n = max(1, int(min_time / max(once, 1e-6)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def alternate(fns: Dict[str, Fn], rounds: int, min_time: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each fn, measured round-robin (same run)."""
    for fn in fns.values():
        fn()  # warm-up (first-call allocations, JIT of oneDNN kernels)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, min_time))
    return {k: statistics.median(v) for k, v in samples.items()}


def weight_bytes(module: torch.nn.Module) -> int:
    """Resident bytes of a module's parameters, buffers and (tensor-subclass) weights."""
    total, seen = 0, set()
    for t in list(module.parameters()) + list(module.buffers()):
        inner = [t]
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            inner = [getattr(t, n) for n in names]
            stack, inner = inner, []
            while stack:
                s = stack.pop()
                if hasattr(s, "__tensor_flatten__") and type(s) is not torch.Tensor and \
                        not isinstance(s, torch.nn.Parameter):
                    stack.extend(getattr(s, n) for n in s.__tensor_flatten__()[0])
                else:
                    inner.append(s)
        for s in inner:
            key = (s.data_ptr(), s.numel())
            if key not in seen:
                seen.add(key)
                total += s.numel() * s.element_size()
    return total


# --------------------------------------------------------------------------- linear

def aq_linear(w: torch.Tensor, bits: int) -> torch.nn.Module:
    qt = aq.quantize_array(w.numpy(), bits=bits, group_size=128, method="mse",
                           param_dtype="float16")
    return aqt.QuantLinear.from_quantized(qt)


def anchors(lin: torch.nn.Linear, skip: List[str]) -> Tuple[Dict[str, Tuple[torch.nn.Module,
                                                                        torch.dtype, Any]],
                                                          Dict[str, str]]:
    """name -> (module, input dtype, grad context), and name -> why it could not run."""
    made: Dict[str, Tuple[torch.nn.Module, torch.dtype, Any]] = {}
    failed: Dict[str, str] = {}

    def attempt(name: str, build: Callable[[], Tuple[torch.nn.Module, torch.dtype, Any]]) -> None:
        if name in skip:
            return
        try:
            mod, dt, ctx = build()
            with ctx():
                mod(torch.randn(2, lin.in_features).to(dt))
            made[name] = (mod, dt, ctx)
        except Exception as exc:  # noqa: BLE001 - an anchor that fails is reported
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    def torchao(config: Callable[[], Any]) -> Callable[[], Tuple[Any, torch.dtype, Any]]:
        def build():
            from torchao.quantization import quantize_

            m = copy.deepcopy(lin).to(torch.bfloat16)
            quantize_(m, config())
            return m, torch.bfloat16, torch.inference_mode
        return build

    def ao_int8():
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig()

    def ao_int4():
        from torchao.dtypes import Int4CPULayout
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout(), version=1)

    attempt("torchao int8wo (bf16)", torchao(ao_int8))
    attempt("torchao int4wo g128 (bf16)", torchao(ao_int4))

    def quanto(kind: str):
        def build():
            import optimum.quanto as oq

            m = torch.nn.Sequential(copy.deepcopy(lin))
            oq.quantize(m, weights=getattr(oq, kind))
            oq.freeze(m)
            # qint4 raises under inference_mode ("Cannot set version_counter").
            return m, torch.float32, torch.no_grad
        return build

    attempt("quanto qint8", quanto("qint8"))
    attempt("quanto qint4", quanto("qint4"))

    def hqq(nbits: int):
        def build():
            from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

            HQQLinear.set_backend(HQQBackend.PYTORCH)
            m = HQQLinear(copy.deepcopy(lin), quant_config=BaseQuantizeConfig(
                nbits=nbits, group_size=128), compute_dtype=torch.float32, device="cpu")
            return m, torch.float32, torch.inference_mode
        return build

    attempt("hqq 8-bit g128 (torch)", hqq(8))
    attempt("hqq 4-bit g128 (torch)", hqq(4))
    return made, failed


def bench_linear(args: argparse.Namespace) -> Dict[str, Any]:
    shapes = [(4096, 4096), (4096, 11008)] if not args.quick else [(4096, 4096)]
    batches = args.batches or ([1, 4, 16, 64, 256] if not args.quick else [1, 64])
    rows: List[Dict[str, Any]] = []
    failed_all: Dict[str, str] = {}
    memory: Dict[str, Dict[str, int]] = {}
    for in_f, out_f in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        impls: Dict[str, Tuple[torch.nn.Module, torch.dtype, Any]] = {
            "float32 nn.Linear": (lin, torch.float32, torch.inference_mode),
            "bfloat16 nn.Linear": (copy.deepcopy(lin).bfloat16(), torch.bfloat16,
                                   torch.inference_mode),
            "arrowquant INT8": (aq_linear(lin.weight, 8), torch.float32, torch.inference_mode),
            "arrowquant INT4": (aq_linear(lin.weight, 4), torch.float32, torch.inference_mode),
        }
        made, failed = anchors(lin, args.skip_anchor)
        impls.update(made)
        failed_all.update(failed)
        memory[f"{in_f}x{out_f}"] = {k: weight_bytes(m) for k, (m, _, _) in impls.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m_rows in batches:
                x = torch.randn(m_rows, in_f)
                fns = {}
                for name, (mod, dt, ctx) in impls.items():
                    xd = x.to(dt)

                    def fn(mod=mod, xd=xd, ctx=ctx):
                        with ctx():
                            return mod(xd)
                    fns[name] = fn
                res = alternate(fns, args.rounds)
                for name, sec in res.items():
                    rows.append({"shape": f"{in_f}x{out_f}", "threads": threads,
                                 "batch": m_rows, "impl": name, "ms": sec * 1e3})
                print(f"linear {in_f}x{out_f} t{threads} M{m_rows}: " +
                      ", ".join(f"{k} {v * 1e3:.2f}" for k, v in res.items()), flush=True)
    return {"rows": rows, "failed": failed_all, "weight_bytes": memory}


# --------------------------------------------------------------------------- policy

def bench_policy(args: argparse.Namespace) -> Dict[str, Any]:
    out: Dict[str, Any] = {"gemv_vs_gemm": [], "gemm_vs_blas": [], "conv": []}
    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    layers = {bits: aq_linear(w, bits) for bits in (4, 8)}
    ref = torch.nn.Linear(4096, 4096, bias=False).requires_grad_(False)
    ref.weight.copy_(w)

    def lin_ref(x):
        with torch.inference_mode():
            return ref(x)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for bits, layer in layers.items():
            for m_rows in ([1, 2, 4, 5, 8, 16] if not args.quick else [4, 8]):
                x = torch.randn(m_rows, 4096)
                y = torch.empty(m_rows, 4096)

                def run(path, x=x, y=y, layer=layer):
                    return lambda: _core.quant_matmul(
                        x, layer.qweight, layer.scales, layer.zero_points, None, None, None, y,
                        4096, 4096, layer.bits, 128, "float16", 0, 0, threads, path)
                res = alternate({"gemv": run("gemv"), "gemm": run("gemm")}, args.rounds)
                out["gemv_vs_gemm"].append({"threads": threads, "bits": bits, "batch": m_rows,
                                            **{k: v * 1e3 for k, v in res.items()}})
                print(f"policy gemv/gemm t{threads} {bits}b M{m_rows}: {res}", flush=True)
            for m_rows in ([16, 64, 256, 1024] if not args.quick else [64]):
                x = torch.randn(m_rows, 4096)
                y = torch.empty(m_rows, 4096)

                def cpp(x=x, y=y, layer=layer):
                    _core.quant_matmul(x, layer.qweight, layer.scales, layer.zero_points, None,
                                       None, None, y, 4096, 4096, layer.bits, 128, "float16", 0,
                                       0, threads, "gemm")

                def blas(panel_mb, x=x, layer=layer):
                    def run():
                        saved = ops.policy()
                        ops.set_policy(panel_bytes=panel_mb << 20)
                        try:
                            ops._blas_linear(x, layer.qweight, layer.scales, layer.zero_points,
                                             None, None, None, 4096, layer.bits, 128, "float16",
                                             0, 0)
                        finally:
                            ops.set_policy(**saved.__dict__)
                    return run
                res = alternate({"cpp_gemm": cpp, "blas_panels": blas(4), "blas_panels_16mb":
                                 blas(16), "float32 nn.Linear": lambda x=x: lin_ref(x)},
                                args.rounds)
                out["gemm_vs_blas"].append({"threads": threads, "bits": bits, "batch": m_rows,
                                            **{k: v * 1e3 for k, v in res.items()}})
                print(f"policy gemm/blas t{threads} {bits}b M{m_rows}: {res}", flush=True)
        convs = [(320, 320, 32, 3), (640, 640, 16, 3), (1280, 1280, 8, 3), (320, 320, 32, 1)]
        for cin, cout, hw, k in (convs if not args.quick else convs[:1]):
            conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).requires_grad_(False)
            qt = aq.quantize_array(conv.weight.numpy(), bits=4, group_size=128,
                                   param_dtype="float16")
            q = aqt.QuantConv2d.from_quantized(qt, conv, bias=conv.bias)
            x = torch.randn(2, cin, hw, hw)
            fns = {}
            for pol in ("dequantize", "unfold"):
                def fn(pol=pol):
                    ops.set_policy(conv=pol)
                    with torch.inference_mode():
                        q(x)
                fns[pol] = fn
            fns["float32 conv2d"] = lambda: conv(x)
            res = alternate(fns, args.rounds)
            ops.set_policy(conv="auto")
            out["conv"].append({"threads": threads, "conv": f"{cin}->{cout} k{k} {hw}x{hw}",
                                **{k2: v * 1e3 for k2, v in res.items()}})
            print(f"policy conv t{threads} {cin} k{k} {hw}: {res}", flush=True)
    return out


# --------------------------------------------------------------------------- models

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                 "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def byte_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer built offline (no merges: one token per
    byte; a real CLIP vocabulary cannot be downloaded here)."""
    import transformers

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77), vocab


def build_pipeline(root: Path) -> Path:
    """A StableDiffusionPipeline with SD 1.5's UNet and VAE geometry and a
    CLIP ViT-L text encoder geometry (random weights, byte vocabulary), saved
    float32 under root/float; reused when present."""
    import diffusers
    import transformers

    out = root / "float"
    if (out / "model_index.json").exists():
        return out
    tok, vocab = byte_tokenizer(root / "tok-src")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    vae = diffusers.AutoencoderKL(**SD15_VAE)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def quantized_pipeline(root: Path, bits: int) -> Path:
    out = root / f"int{bits}"
    if not (out / "metadata.json").exists():
        t0 = time.perf_counter()
        aq.quantize(root / "float", out, bits=bits, progress=False, overwrite=True)
        print(f"quantized the pipeline to INT{bits} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return out


def file_bytes(qdir: Path) -> int:
    meta = json.loads((qdir / "metadata.json").read_text())
    return int(meta["summary"]["output_bytes"])


def bench_unet(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    import diffusers
    from arrowquant.diffusers import load_component

    base = build_pipeline(root)
    models = {"float32": diffusers.UNet2DConditionModel.from_pretrained(base / "unet").eval()}
    stored = {}
    for bits in (8, 4):
        q = quantized_pipeline(root, bits)
        models[f"INT{bits}"] = load_component(q / "unet")
        stored[f"INT{bits}"] = file_bytes(q / "unet")
    hw = args.latent
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, hw, hw, generator=gen)
    text = torch.randn(2, 77, 768, generator=gen)
    res_rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        fns = {}
        for name, m in models.items():
            def fn(m=m):
                with torch.inference_mode():
                    return m(sample, 500, encoder_hidden_states=text).sample
            fns[name] = fn
        res = alternate(fns, max(2, args.rounds // 2), min_time=0.0)
        print(f"unet t{threads}: {res}", flush=True)
        for name, sec in res.items():
            res_rows.append({"threads": threads, "impl": name, "s": sec})
    params = sum(p.numel() for p in models["float32"].parameters())
    resident = {k: aqt.module_weight_bytes(m) for k, m in models.items()}
    return {"rows": res_rows, "params": params, "resident_bytes": resident,
            "file_bytes": stored, "latent": hw, "batch": 2}


def bench_dit(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    from diffusers.models.attention import BasicTransformerBlock
    from safetensors.torch import save_file

    def block():
        return BasicTransformerBlock(1152, 16, 72, norm_type="ada_norm_zero",
                                     num_embeds_ada_norm=1000)

    torch.manual_seed(0)
    ref = block().eval()
    src = root / "dit-block"
    src.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(src / "model.safetensors"))
    models = {"float32": ref}
    stored = {}
    for bits in (8, 4):
        q = root / f"dit-block-int{bits}"
        if not (q / "metadata.json").exists():
            aq.quantize(src, q, bits=bits, progress=False, overwrite=True)
        with aqt.parameters_on_meta():
            m = block()
        aqt.populate(m, q)
        models[f"INT{bits}"] = m
        stored[f"INT{bits}"] = file_bytes(q)
    tokens = (args.latent // 2) ** 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, 1152, generator=gen)
    t = torch.tensor([500, 500])
    labels = torch.tensor([1, 2])
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        fns = {}
        for name, m in models.items():
            def fn(m=m):
                with torch.inference_mode():
                    return m(x, timestep=t, class_labels=labels)
            fns[name] = fn
        res = alternate(fns, args.rounds)
        print(f"dit t{threads}: {res}", flush=True)
        rows.extend({"threads": threads, "impl": k, "ms": v * 1e3} for k, v in res.items())
    return {"rows": rows, "tokens": tokens, "batch": 2, "params":
            sum(p.numel() for p in ref.parameters()),
            "resident_bytes": {k: aqt.module_weight_bytes(m) for k, m in models.items()},
            "file_bytes": stored}


RSS_CHILD = textwrap.dedent("""
    import json, os, sys, time, warnings
    warnings.filterwarnings("ignore")
    sys.path[:0] = [p for p in sys.argv[3:] if p]
    import torch, diffusers, transformers
    import arrowquant.torch as aqt
    from arrowquant.diffusers import load_pipeline
    torch.set_num_threads(int(sys.argv[2]))
    def status(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key))
        return int(line.split()[1]) * 1024
    base = status("VmRSS:")
    t0 = time.perf_counter()
    path = sys.argv[1]
    if path.endswith("float"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    else:
        pipe = load_pipeline(path)
    load_s = time.perf_counter() - t0
    after_load = status("VmRSS:")
    load_peak = status("VmHWM:")
    weights = sum(aqt.module_weight_bytes(getattr(pipe, n))
                  for n in ("unet", "vae", "text_encoder"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe("a photograph of a red cat", num_inference_steps=2, height=256, width=256,
             generator=torch.manual_seed(0), output_type="np")
    run_s = time.perf_counter() - t0
    print(json.dumps({"base": base, "after_load": after_load, "load_peak": load_peak,
                      "peak": status("VmHWM:"), "weights": weights, "load_s": load_s,
                      "run_s": run_s}))
""")


def bench_rss(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    base = build_pipeline(root)
    dirs = {"float32": base, "INT8": quantized_pipeline(root, 8),
            "INT4": quantized_pipeline(root, 4)}
    rows = []
    py = str(REPO / "python") if (REPO / "python" / "arrowquant").is_dir() else ""
    for name, d in dirs.items():
        r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(d), str(max(args.threads)), py],
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            rows.append({"impl": name, "error": r.stderr[-600:]})
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        m["impl"] = name
        m["file_bytes"] = None if name == "float32" else file_bytes(d)
        rows.append(m)
        print(f"rss {name}: {m}", flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------- report

def markdown(res: Dict[str, Any]) -> str:
    lines = [f"Machine: {res['versions'].get('cpu')}, torch {res['versions']['torch']}, "
             f"{os.cpu_count()} cores; medians of {res['args']['rounds']} alternating rounds.", ""]
    lin = res.get("linear")
    if lin:
        impls = list(dict.fromkeys(r["impl"] for r in lin["rows"]))
        for shape in dict.fromkeys(r["shape"] for r in lin["rows"]):
            for threads in dict.fromkeys(r["threads"] for r in lin["rows"]):
                sub = [r for r in lin["rows"] if r["shape"] == shape and r["threads"] == threads]
                batches = sorted({r["batch"] for r in sub})
                lines += [f"Linear {shape} (in x out), {threads} thread(s), ms per call:", "",
                          "| implementation | " + " | ".join(f"batch {b}" for b in batches) +
                          " | weights MB |",
                          "|---|" + "---:|" * (len(batches) + 1)]
                for impl in impls:
                    cells = []
                    for b in batches:
                        v = [r["ms"] for r in sub if r["impl"] == impl and r["batch"] == b]
                        cells.append(f"{v[0]:.2f}" if v else "")
                    mb = lin["weight_bytes"].get(shape, {}).get(impl)
                    lines.append(f"| {impl} | " + " | ".join(cells) +
                                 f" | {mb / MB:.1f} |" if mb else " |")
                lines.append("")
        if lin["failed"]:
            lines += ["Anchors that could not run:", ""]
            lines += [f"- {k}: {v}" for k, v in lin["failed"].items()]
            lines.append("")
    pol = res.get("policy")
    if pol:
        lines += ["GEMV vs C++ GEMM (4096x4096, ms):", "",
                  "| threads | bits | batch | gemv | gemm |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['bits']} | {r['batch']} | {r['gemv']:.2f} | "
                  f"{r['gemm']:.2f} |" for r in pol["gemv_vs_gemm"]]
        lines += ["", "C++ GEMM vs torch BLAS on dequantized panels (4096x4096, ms):", "",
                  "| threads | bits | batch | C++ GEMM | BLAS, 4 MB panels | BLAS, 16 MB panels | "
                  "float32 nn.Linear |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['bits']} | {r['batch']} | {r['cpp_gemm']:.2f} | "
                  f"{r['blas_panels']:.2f} | {r['blas_panels_16mb']:.2f} | "
                  f"{r['float32 nn.Linear']:.2f} |" for r in pol["gemm_vs_blas"]]
        lines += ["", "QuantConv2d INT4 (batch 2, ms):", "",
                  "| threads | conv | dequantize + conv2d | unfold + GEMM | float32 conv2d |",
                  "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['conv']} | {r['dequantize']:.2f} | {r['unfold']:.2f} | "
                  f"{r['float32 conv2d']:.2f} |" for r in pol["conv"]]
        lines.append("")
    for key, unit, label in (("unet", "s", "UNet2DConditionModel step"),
                             ("dit", "ms", "DiT-XL/2 block")):
        sec = res.get(key)
        if not sec:
            continue
        shape = (f"latent {sec['latent']}x{sec['latent']}, batch {sec['batch']}" if key == "unet"
                 else f"{sec['tokens']} tokens, batch {sec['batch']}")
        lines += [f"{label} ({sec['params'] / 1e6:.0f}M parameters, {shape}):", "",
                  f"| threads | weights | {unit} per step | vs float32 | resident weights MB | "
                  "file MB |", "|---:|---|---:|---:|---:|---:|"]
        for r in sec["rows"]:
            base = next(x for x in sec["rows"] if x["threads"] == r["threads"] and
                        x["impl"] == "float32")
            fb = sec["file_bytes"].get(r["impl"])
            lines.append(f"| {r['threads']} | {r['impl']} | {r[unit]:.3f} | "
                         f"{r[unit] / base[unit]:.2f}x | "
                         f"{sec['resident_bytes'][r['impl']] / MB:.1f} | "
                         f"{fb / MB:.1f} |" if fb else
                         f"| {r['threads']} | {r['impl']} | {r[unit]:.3f} | 1.00x | "
                         f"{sec['resident_bytes'][r['impl']] / MB:.1f} | |")
        lines.append("")
    rss = res.get("rss")
    if rss:
        lines += ["Pipeline end to end (load, then 2 steps at 256x256), fresh process each:", "",
                  "| weights | load s | run s | RSS after imports MB | peak while loading MB | "
                  "peak MB | weights resident MB | file MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rss["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | failed: {r['error'][-120:]!r} |")
                continue
            fb = f"{r['file_bytes'] / MB:.0f}" if r.get("file_bytes") else ""
            lines.append(f"| {r['impl']} | {r['load_s']:.1f} | {r['run_s']:.1f} | "
                         f"{r['base'] / MB:.0f} | {r['load_peak'] / MB:.0f} | "
                         f"{r['peak'] / MB:.0f} | "
                         f"{r['weights'] / MB:.0f} | {fb} |")
        lines.append("")
    return "\n".join(lines)


def chart(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lin = res["linear"]
    shapes = list(dict.fromkeys(r["shape"] for r in lin["rows"]))
    threads = list(dict.fromkeys(r["threads"] for r in lin["rows"]))
    fig, axes = plt.subplots(len(shapes), len(threads), figsize=(6 * len(threads),
                                                                 4.2 * len(shapes)),
                             squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in lin["rows"]))
    for i, shape in enumerate(shapes):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r["batch"], r["ms"]) for r in lin["rows"]
                             if r["shape"] == shape and r["threads"] == t and r["impl"] == impl)
                if not pts:
                    continue
                style = "-o" if impl.startswith("arrowquant") else \
                    ("-s" if "nn.Linear" in impl else "--.")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl,
                        linewidth=2.2 if impl.startswith("arrowquant") else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch (rows of x)")
            ax.set_ylabel("ms per call")
            ax.set_title(f"Linear {shape}, {t} thread(s)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["linear", "policy", "unet", "dit", "rss"],
                    choices=["linear", "policy", "unet", "dit", "rss"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latent", type=int, default=32, help="UNet latent size (32: 256 px images)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and batches")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="linear: batch sizes (default 1 4 16 64 256)")
    ap.add_argument("--skip-anchor", nargs="*", default=[])
    ap.add_argument("--output-dir", type=Path, default=REPO / ".benchmarks" / "runtime")
    ap.add_argument("--models-dir", type=Path, default=REPO / ".benchmarks" / "runtime-models")
    ap.add_argument("--keep-models", action="store_true")
    args = ap.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.output_dir / "runtime_benchmark.json"
    res: Dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    res.update({"versions": versions(), "args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                "kernel": ops.active_kernel(), "policy_in_use": ops.policy().__dict__})
    for sec in args.sections:
        t0 = time.perf_counter()
        try:
            if sec == "linear":
                res["linear"] = bench_linear(args)
            elif sec == "policy":
                res["policy"] = bench_policy(args)
            elif sec == "unet":
                res["unet"] = bench_unet(args, args.models_dir)
            elif sec == "dit":
                res["dit"] = bench_dit(args, args.models_dir)
            elif sec == "rss":
                res["rss"] = bench_rss(args, args.models_dir)
        except Exception:  # noqa: BLE001 - the other sections still run and are written
            res[f"{sec}_error"] = traceback.format_exc()
            print(res[f"{sec}_error"], file=sys.stderr)
        print(f"section {sec}: {time.perf_counter() - t0:.0f} s", flush=True)
        out_json.write_text(json.dumps(res, indent=1))
    (args.output_dir / "runtime_benchmark.md").write_text(markdown(res))
    if res.get("linear"):
        chart(res, args.output_dir / "runtime_linear.png")
    if not args.keep_models and args.models_dir.exists() and \
            {"unet", "rss"} & set(args.sections):
        shutil.rmtree(args.models_dir, ignore_errors=True)
    print((args.output_dir / "runtime_benchmark.md").read_text())


if __name__ == "__main__":
    main()
