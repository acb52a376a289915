"""Diffusion GGUF against stable-diffusion.cpp, on a full-size SD 1.5-architecture
pipeline with seeded random weights (arrowquant.synthetic_diffusion).

For each type: stable-diffusion.cpp's own conversion of the diffusers
directory (its `convert`, through stable-diffusion-cpp-python) and
ArrowQuant's sdcpp-layout file, each made in a fresh subprocess (wall time,
peak RSS = VmHWM of that process); then every file renders the same
prompt at the smallest size in a few steps with a fixed seed in sd.cpp (a
fresh subprocess each), and the PSNR of each render against the render of
sd.cpp's own F16 file is reported, with the file sizes. Tensor error: SQNR of
every quantized tensor of both files against the source weights (decoded with
gguf-py's `gguf.quants.dequantize`).

    python benches/gguf_diffusion_bench.py --work /tmp/gd --types F16,Q8_0,Q4_0,Q4_K \
        --text-encoder-rounding Q8_0,Q4_0,Q4_K --prompt "a photograph of an astronaut riding a horse|a red cube on a wooden table, studio light|portrait of an old man with a beard, oil painting"

Writes --work/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Peak RSS is the child's VmHWM (/proc/self/status): ru_maxrss would carry
# over the parent's resident size from before exec (Linux keeps the pre-exec
# high-water mark), which inflates it when the parent is large (pytest).
_CHILD_PRELUDE = """
import json, resource, sys, time
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sys.path.insert(0, {python!r})
t0 = time.perf_counter()
"""
_CHILD_END = """
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t0, "max_rss_mb": hwm_mb(),
      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **res}}))
"""


def run_child(body: str, timeout: float = 3600) -> Dict[str, Any]:
    """Runs `body` (which sets `res`, a dict) in a fresh interpreter; returns
    res + seconds + max_rss_mb of that process."""
    code = _CHILD_PRELUDE.format(python=str(REPO / "python")) + body + _CHILD_END.format()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def sdcpp_convert(src: Path, out: Path, gtype: str) -> Dict[str, Any]:
    """stable-diffusion.cpp's convert of `src` (a diffusers directory) to `gtype`."""
    return run_child(f"""
import stable_diffusion_cpp.stable_diffusion_cpp as sd
from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP
ok = sd.convert({str(src)!r}.encode(), b"", {str(out)!r}.encode(),
                int(GGML_TYPE_MAP[{gtype.lower()!r}]), b"", True)
res = {{"ok": bool(ok)}}
""")


def arrowquant_convert(src: Path, out: Path, gtype: str, max_memory: str = "256MiB",
                       layout: str = "sdcpp", block_mode: Any = "search") -> Dict[str, Any]:
    return run_child(f"""
from arrowquant.formats.gguf.diffusion import export_diffusion_gguf
import arrowquant._core
after_import = hwm_mb()
r = export_diffusion_gguf({str(src)!r}, {str(out)!r}, gguf_type={gtype!r}, layout={layout!r},
                          max_memory={max_memory!r}, overwrite=True, progress=False,
                          block_mode={block_mode!r})
res = {{"ok": True, "baseline_rss_mb": after_import, "types": r["types"],
        "rules": {{k: sum(1 for t in r["tensors_detail"] if t["rule"] == k)
                  for k in set(t["rule"] for t in r["tensors_detail"])}}}}
""")


def render(model: Path, png: Path, steps: int, size: int, seed: int, prompt: str,
           batch: int = 1) -> Dict[str, Any]:
    """`batch` images (seeds seed, seed+1, ...: sd.cpp's batch), saved as
    png, png with .1.png, .2.png ... for the next ones."""
    return run_child(f"""
from stable_diffusion_cpp import StableDiffusion
sd = StableDiffusion(model_path={str(model)!r}, n_threads=2, verbose=False)
imgs = sd.generate_image(prompt={prompt!r}, width={size}, height={size}, sample_steps={steps},
                         seed={seed}, cfg_scale=7.0, sample_method="euler", batch_count={batch})
for i, img in enumerate(imgs):
    img.save({str(png)!r} if i == 0 else {str(png)!r}[:-4] + f".{{i}}.png")
res = {{"ok": True, "images": len(imgs)}}
""")


def _prompt_png(png: Path, k: int) -> Path:
    return png if k == 0 else png.with_name(png.stem + f".p{k}.png")


def render_files(png: Path, batch: int) -> List[Path]:
    return [png] + [png.with_name(png.stem + f".{i}.png") for i in range(1, batch)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def load_png(p: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(p).convert("RGB"))


def tensor_sqnr(file: Path, reference: Path) -> Dict[str, Dict[str, Any]]:
    """Per tensor of `file` (quantized types only): type and SQNR against the
    same tensor of `reference` (an F16 file of the same weights and names)."""
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(str(reference)).tensors}
    out: Dict[str, Dict[str, Any]] = {}
    for t in gguf.GGUFReader(str(file)).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        r = ref.get(t.name)
        if r is None:
            continue
        x = gguf.quants.dequantize(r.data, r.tensor_type).astype(np.float64).reshape(-1)
        y = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        err = float(np.sum((x - y) ** 2))
        out[t.name] = {"type": t.tensor_type.name, "numel": int(x.size), "ndim": len(t.shape),
                       "sqnr_db": math.inf if err == 0 else 10 * math.log10(float(np.sum(x * x)) / err)}
    return out


def convert_timings(pipe: Path, work: Path, types: List[str], rounds: int, max_memory: str) -> int:
    """Alternating sd.cpp / ArrowQuant conversions, each in a fresh process."""
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for _ in range(rounds):
        for gt in types:
            for tool in ("sdcpp", "arrowquant"):
                f = work / f"time-{tool}-{gt}.gguf"
                m = sdcpp_convert(pipe, f, gt) if tool == "sdcpp" else \
                    arrowquant_convert(pipe, f, gt, max_memory)
                m["bytes"] = f.stat().st_size
                f.unlink()
                runs.setdefault(f"{tool} {gt}", []).append(m)
                print(json.dumps({"run": f"{tool} {gt}", **m}), flush=True)
    print(f"| tool, type | wall s (median of {rounds}) | peak RSS MiB | baseline MiB | file MiB |")
    print("|---|---:|---:|---:|---:|")
    for k, v in runs.items():
        base = v[0].get("baseline_rss_mb")
        print(f"| {k} | {float(np.median([x['seconds'] for x in v])):.1f} | "
              f"{max(x['max_rss_mb'] for x in v):.0f} | {'-' if base is None else f'{base:.0f}'} | "
              f"{v[0]['bytes'] / 2**20:.1f} |")
    (work / "convert_timings.json").write_text(json.dumps(runs, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pipeline", type=Path, default=None,
                    help="diffusers SD 1.x directory (default: the cached random SD 1.5 pipeline)")
    ap.add_argument("--types", default="F16,Q8_0,Q4_0")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse",
                    help="one prompt, or several separated by '|' (each rendered; PSNR is the mean "
                         "over prompts and seeds)")
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--batch", type=int, default=1,
                    help="images per render (seeds seed, seed+1, ...); PSNR is their mean")
    ap.add_argument("--reference-mode", default="Q8_0,Q4_0",
                    help="types also written by ArrowQuant with plain rounding (block_mode reference)")
    ap.add_argument("--text-encoder-rounding", default="",
                    help="types also written by ArrowQuant with the text encoder by plain rounding "
                         "(block_mode={'text_encoder': 'reference'}), e.g. Q8_0,Q4_0,Q4_K")
    ap.add_argument("--reuse", action="store_true",
                    help="keep GGUF files and renders already in --work (no conversion, no convert "
                         "timing, no re-render)")
    ap.add_argument("--no-sqnr", action="store_true", help="skip the per-tensor SQNR comparison")
    ap.add_argument("--f16-sdcpp-only", action="store_true",
                    help="render only sd.cpp's F16 file as the reference (ArrowQuant's F16 equality "
                         "is then not re-checked)")
    ap.add_argument("--convert-only", type=int, default=0, metavar="N",
                    help="only time the conversions: N alternating rounds of sd.cpp / ArrowQuant "
                         "per type (fresh subprocess each), medians")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "python"))
    from arrowquant.synthetic_diffusion import generate_sd15_pipeline

    pipe = args.pipeline or generate_sd15_pipeline()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.convert_only:
        return convert_timings(pipe, work, [t.strip().upper() for t in args.types.split(",")],
                               args.convert_only, args.max_memory)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if "F16" not in types:
        types.insert(0, "F16")
    ref_mode = {t.strip().upper() for t in args.reference_mode.split(",") if t.strip()}
    prompts = [p.strip() for p in args.prompt.split("|") if p.strip()]
    rows: List[Dict[str, Any]] = []
    for gt in types:
        te_round = {t.strip().upper() for t in args.text_encoder_rounding.split(",") if t.strip()}
        tools = ["sdcpp", "arrowquant"] + (["arrowquant-rounding"] if gt in ref_mode else []) + \
            (["arrowquant-te-rounding"] if gt in te_round else [])
        if gt == "F16" and args.f16_sdcpp_only:
            tools = ["sdcpp"]
        for tool in tools:
            f = work / f"{tool}-{gt}.gguf"
            if args.reuse and f.exists():
                m: Dict[str, Any] = {"seconds": None, "max_rss_mb": None}
            elif tool == "sdcpp":
                m = sdcpp_convert(pipe, f, gt)
            else:
                mode = {"arrowquant-rounding": "reference",
                        "arrowquant-te-rounding": {"text_encoder": "reference"}}.get(tool, "search")
                m = arrowquant_convert(pipe, f, gt, args.max_memory, block_mode=mode)
            png = work / f"{tool}-{gt}.png"
            rr = {"seconds": 0.0}
            for k, prompt in enumerate(prompts):
                if args.reuse and all(q.exists() for q in render_files(_prompt_png(png, k), args.batch)):
                    continue
                rk = render(f, _prompt_png(png, k), args.steps, args.size, args.seed, prompt, args.batch)
                rr["seconds"] += rk["seconds"]
            rows.append({"tool": tool, "type": gt, "file": str(f), "bytes": f.stat().st_size,
                         "convert_seconds": m["seconds"], "convert_max_rss_mb": m["max_rss_mb"],
                         "baseline_rss_mb": m.get("baseline_rss_mb"), "types": m.get("types"),
                         "render_seconds": rr["seconds"], "png": str(png)})
            print(json.dumps(rows[-1]), flush=True)
    def images(png: Path) -> List[np.ndarray]:
        return [load_png(q) for k in range(len(prompts))
                for q in render_files(_prompt_png(png, k), args.batch)]

    refs = images(work / "sdcpp-F16.png")
    aq_refs = None if args.f16_sdcpp_only else images(work / "arrowquant-F16.png")
    for r in rows:
        imgs = images(Path(r["png"]))
        ps = [psnr(a, b) for a, b in zip(refs, imgs)]
        r["psnr_each"] = ps
        r["psnr_vs_sdcpp_f16"] = float(np.mean(ps))
        r["psnr_vs_arrowquant_f16"] = None if aq_refs is None else \
            float(np.mean([psnr(a, b) for a, b in zip(aq_refs, imgs)]))
        r["bit_identical_to_sdcpp_f16"] = all(np.array_equal(a, b) for a, b in zip(refs, imgs))
    sq: Dict[str, Any] = {}
    for gt in ([] if args.no_sqnr else types):
        if gt in ("F16", "F32"):
            continue
        a = tensor_sqnr(work / f"arrowquant-{gt}.gguf", work / "sdcpp-F16.gguf")
        s = tensor_sqnr(work / f"sdcpp-{gt}.gguf", work / "sdcpp-F16.gguf")
        common = [n for n in a if n in s and a[n]["type"] == s[n]["type"]]
        diffs = [a[n]["sqnr_db"] - s[n]["sqnr_db"] for n in common
                 if math.isfinite(a[n]["sqnr_db"]) and math.isfinite(s[n]["sqnr_db"])]
        sq[gt] = {
            "arrowquant_quantized": len(a), "sdcpp_quantized": len(s), "same_type": len(common),
            "mean_sqnr_arrowquant": float(np.mean([a[n]["sqnr_db"] for n in common])) if common else None,
            "mean_sqnr_sdcpp": float(np.mean([s[n]["sqnr_db"] for n in common])) if common else None,
            "max_abs_diff_db": float(np.max(np.abs(diffs))) if diffs else None,
            "arrowquant_better": sum(1 for d in diffs if d > 0),
            "min_diff_db": float(np.min(diffs)) if diffs else None,
            "sdcpp_only_count": len(set(s) - set(a)),
            "sdcpp_only_1d": sum(1 for n in set(s) - set(a) if s[n]["ndim"] == 1),
            "arrowquant_only_count": len(set(a) - set(s)),
            "per_tensor": {n: {"type": a[n]["type"], "arrowquant_db": a[n]["sqnr_db"],
                               "sdcpp_db": s[n]["sqnr_db"]} for n in common},
            "other": {n: {"arrowquant": a.get(n, {}).get("type"), "sdcpp": s.get(n, {}).get("type"),
                          "arrowquant_db": a.get(n, {}).get("sqnr_db"),
                          "sdcpp_db": s.get(n, {}).get("sqnr_db")}
                      for n in sorted(set(a) ^ set(s) | {n for n in a if n in s and n not in common})},
        }
    res = {"pipeline": str(pipe), "steps": args.steps, "size": args.size, "seed": args.seed,
           "prompts": prompts, "batch": args.batch, "rows": rows, "tensor_sqnr": sq,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (work / "results.json").write_text(json.dumps(res, indent=2))
    print(f"| tool | type | file MiB | convert s | convert peak RSS MiB | PSNR vs sd.cpp F16 (dB, mean of "
          f"{len(prompts)} prompts x {args.batch} seeds) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        p = "identical" if r["bit_identical_to_sdcpp_f16"] else \
            f"{r['psnr_vs_sdcpp_f16']:.2f} ({', '.join(f'{x:.1f}' for x in r['psnr_each'])})"
        cs = "-" if r["convert_seconds"] is None else f"{r['convert_seconds']:.1f}"
        cm = "-" if r["convert_max_rss_mb"] is None else f"{r['convert_max_rss_mb']:.0f}"
        print(f"| {r['tool']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {cs} | {cm} | {p} |")
    print(json.dumps({k: {a: b for a, b in v.items() if a not in ("per_tensor", "other")}
                      for k, v in sq.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
