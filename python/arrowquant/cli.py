"""`arrowquant` command line: parses flags and calls the API (arrowquant.api)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .errors import ArrowQuantError
from .files import save_traceback
from .jsonfile import dumps
from .text import printable
from .sizes import format_size

from .formats.gguf.tables import GGUF_PRESETS, GGUF_TYPES

GGUF_ARCHS = ("auto", "generic")
GGUF_ARCH_HELP = ("auto (default): llama.cpp's architecture, tensor names, hyperparameters and "
                  "tokenizer for a Hugging Face model directory, so llama.cpp runs the file; "
                  "generic: the source's tensor names as they are (llama.cpp cannot run it)")


def _add_gguf_layout_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf-layout", choices=("sdcpp", "comfy"), default=None,
                   help="diffusion models: tensor names and rules of stable-diffusion.cpp "
                        "(default for a diffusers pipeline / UNet / FLUX input) or ComfyUI-GGUF")


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that an unset flag does not override --config,
    # --profile or ARROW_QUANT_* (precedence: profile < file < env < flags).
    p.add_argument("--bits", type=int, choices=(2, 4, 8), default=None,
                   help="bits per weight code (default 4)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="weights per group sharing one scale and zero point (default 128)")
    p.add_argument("--scheme", choices=("asymmetric", "symmetric"), default=None,
                   help="affine with a zero point (default) or symmetric around zero")
    p.add_argument("--method", choices=("rtn", "mse", "grid-nl", "grid-learned"), default=None,
                   help="how scales are chosen: mse = error-minimizing search, "
                        "rtn = plain min/max (FORMAT.md section 2; default per bit width); "
                        "grid-nl / grid-learned = mse on a non-uniform code grid, the fixed "
                        "IQ4_NL-shaped 4-bit table or one learned per tensor (FORMAT.md "
                        "section 10; files say format version 3)")
    p.add_argument("--param-dtype", choices=("float32", "float16", "superblock"), default=None,
                   help="storage of scales and zero points (default float16): float32 or "
                        "float16 per group (64 or 32 bits per group: INT4 g128 = 4.25 bits per "
                        "weight at float16); superblock = two levels like llama.cpp's K-quants, "
                        "a 6-bit (INT2: 4-bit) scale and zero code per group and two float16 "
                        "units per 256 weights (INT4 g32 = 4.5, INT2 g16 = 2.625 bits per "
                        "weight; asymmetric only). With --method mse it beats Q4_K / Q2_K at "
                        "those sizes but quantizes about 4x slower than the default "
                        "(docs/quality.md)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="engine threads (default 0 = all cores)")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (see docs/CONFIGURATION.md)")
    g.add_argument("--config", metavar="FILE", help="YAML configuration file")
    g.add_argument("--profile", choices=("edge", "local", "cloud", "base"),
                   help="preset: edge (2 bits, g256), local (4 bits, g128; default), "
                        "cloud (8 bits, g64), base (4 bits, no time-aware / spatial)")
    g.add_argument("--target-bpw", type=float, default=None, metavar="X",
                   help="mixed precision: choose 2/4/8 bits or float16 per layer to minimize "
                        "error at X bits per weight on average (parameters included)")
    g.add_argument("--mixed-precision", action="store_true", default=None,
                   help="mixed precision at the budget of uniform --bits")
    g.add_argument("--keep", action="append", default=None, metavar="PATTERN",
                   help="never quantize tensors matching PATTERN (fnmatch, or re:REGEX); repeatable")
    g.add_argument("--bits-for", action="append", default=None, metavar="PATTERN=BITS",
                   help="bits for tensors matching PATTERN (16 = keep); repeatable")
    g.add_argument("--skip-sensitive", action="store_true", default=None,
                   help="keep embeddings, norms and output heads unquantized")
    g.add_argument("--fallback-threshold", action="append", default=None, metavar="BITS=COS",
                   help="cosine floor per width below which a layer is redone at the next "
                        "width (defaults 2=0.70, 4=0.90, 8=0.95; 0 disables)")
    g.add_argument("--fail-fast", action="store_true", default=None,
                   help="stop with an error instead of falling back")
    g.add_argument("--min-accuracy", type=float, default=None, metavar="COS",
                   help="mean cosine the model must reach (warning, or error with --fail-fast)")
    g.add_argument("--modality", choices=("text", "code", "image", "audio"),
                   help="override modality detection")
    g.add_argument("--quantize-1d", action="store_true", default=None,
                   help="also quantize 0-D/1-D tensors (biases, norms); kept as is by default")
    g.add_argument("--calibration", metavar="STATS",
                   help="activation statistics from `arrowquant calibrate`: importance-weighted "
                        "scales and channel equalization for the layers they cover")
    g.add_argument("--no-time-aware", dest="time_aware", action="store_false", default=None,
                   help="pool the statistics of all timesteps instead of keeping every "
                        "timestep group's salient channels")
    g.add_argument("--no-spatial", dest="spatial", action="store_false", default=None,
                   help="no channel equalization (importance weighting only)")


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster (docs/ray.md; pip install 'arrowquant[ray]')")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="quantize the chunks on this machine (default) or in Ray tasks; the "
                        "output is the same bytes")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to use: host:port, or auto for the one `ray start` made "
                        "(default: RAY_ADDRESS, else a local cluster)")
    g.add_argument("--ray-cpus-per-task", type=int, default=0, metavar="N",
                   help="CPUs Ray reserves per task (default: --threads, else all CPUs of "
                        "the smallest node); a task's engine threads: --threads, else N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrowquant",
        description="Quantize model weights (SafeTensors, sharded Hugging Face / diffusers, "
                    "Parquet V1) to INT2/INT4/INT8, group-wise, with a report of what each "
                    "layer lost.",
    )
    parser.add_argument("--version", action="version", version=f"arrowquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model into ArrowQuant Parquet V2",
                       description="Quantize INPUT (a .safetensors file, a model directory, a "
                                   "sharded index, or Parquet V1) into the directory OUTPUT.")
    q.add_argument("input", help="model file or directory")
    q.add_argument("output", help="output directory (ArrowQuant Parquet V2)")
    _add_quant_flags(q)
    _add_config_flags(q)
    q.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the pipeline's buffers (default 256MiB, or "
                        "ARROW_QUANT_MAX_MEMORY_MB / max_memory_limit_mb of --config)")
    q.add_argument("--chunk-size", default="256MiB", metavar="SIZE",
                   help="largest piece of one tensor stored as one row (default 256MiB of source)")
    q.add_argument("--shard-size", default="2GiB", metavar="SIZE",
                   help="split the output into files of about this size (default 2GiB)")
    q.add_argument("--engine", choices=("native", "reference"), default="native",
                   help="C++ engine (default) or the numpy reference (slow; for checks)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mode.add_argument("--resume", action="store_true", help="finish an interrupted run")
    q.add_argument("--format", choices=("parquet", "gguf"), default="parquet",
                   help="output: an ArrowQuant Parquet V2 directory (default) or one GGUF file")
    q.add_argument("--gguf-type", choices=GGUF_TYPES + GGUF_PRESETS,
                   help="GGUF tensor type (default from --bits/--scheme: 8 -> Q8_0, "
                        "4 symmetric -> Q4_0, 4 asymmetric -> Q4_1) or a llama.cpp preset "
                        "(Q4_K_M, Q5_K_M, Q3_K_M, Q2_K, Q6_K, Q8_0, IQ4_XS, ...: llama.cpp's "
                        "per-tensor mix; with --keep / --bits-for / --target-bpw, docs/gguf.md)")
    q.add_argument("--gguf-arch", choices=GGUF_ARCHS, default="auto", help=GGUF_ARCH_HELP)
    _add_gguf_layout_flag(q)
    _add_ray_flags(q)
    q.add_argument("-v", "--verbose", action="store_true", help="one line per tensor (with Ray: per work unit and per worker too)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="list a model's tensors, dtypes, quant types, sizes")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("validate", help="compare a quantized model with its original",
                       description="Per-layer cosine, relative MSE, SQNR and max error; exits 1 "
                                   "when a layer is below the threshold of its bit width.")
    v.add_argument("original")
    v.add_argument("quantized")
    v.add_argument("--report", metavar="FILE", help="write a .json or .md report")
    v.add_argument("--threshold", action="append", default=[], metavar="BITS=COS",
                   help="cosine threshold for a width, e.g. 4=0.95 (repeatable)")
    v.add_argument("--json", action="store_true")

    d = sub.add_parser("dequantize", help="write a quantized model back to SafeTensors")
    d.add_argument("quantized")
    d.add_argument("output", help="output .safetensors file")
    d.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    d.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("export-gguf", help="write a model (source or ArrowQuant V2) as a GGUF file")
    g.add_argument("input", help="model file or directory, or an ArrowQuant V2 directory")
    g.add_argument("output", help="output .gguf file")
    g.add_argument("--bits", type=int, choices=(4, 8), default=4)
    g.add_argument("--scheme", choices=("symmetric", "asymmetric"), default="symmetric",
                   help="4 bits: symmetric -> Q4_0 (default), asymmetric -> Q4_1")
    g.add_argument("--gguf-type", choices=GGUF_TYPES + GGUF_PRESETS)
    g.add_argument("--gguf-arch", choices=GGUF_ARCHS, default="auto", help=GGUF_ARCH_HELP)
    _add_gguf_layout_flag(g)
    g.add_argument("--max-memory", default="256MiB", metavar="SIZE",
                   help="diffusion layouts: memory budget of the read buffers (default 256MiB)")
    g.add_argument("--threads", type=int, default=0, metavar="N")
    # Per-tensor choices (docs/gguf.md "Presets, patterns and a bit budget").
    g.add_argument("--keep", action="append", default=None, metavar="PATTERN",
                   help="store tensors matching PATTERN unquantized; repeatable")
    g.add_argument("--bits-for", action="append", default=None, metavar="PATTERN=BITS",
                   help="2 -> Q2_K, 4 -> Q4_K, 8 -> Q8_0, 16 -> unquantized; repeatable")
    g.add_argument("--target-bpw", type=float, default=None, metavar="X",
                   help="a type per tensor from its measured error, X bits per weight overall")
    g.add_argument("--calibration", metavar="STATS", default=None,
                   help="statistics of `arrowquant calibrate`: importance-weighted search")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file")
    g.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("calibrate", help="record activation statistics across timesteps",
                       description="Run MODEL (diffusers UNet / DiT / pipeline, or a transformers "
                                   "model) on calibration inputs and record per-input-channel "
                                   "activation statistics of every Linear / Conv2d layer, per "
                                   "timestep group (needs torch and diffusers / transformers).")
    c.add_argument("model", help="model directory")
    c.add_argument("--out", required=True, metavar="STATS", help="output statistics (.parquet)")
    c.add_argument("--num-time-groups", type=int, default=10, metavar="N")
    c.add_argument("--samples", type=int, default=None, metavar="N",
                   help="latents (diffusers, default 4) or sentences (text models)")
    c.add_argument("--inputs", metavar="FILE",
                   help="calibration inputs: .txt sentences, or JSONL / Parquet / Arrow records "
                        "of the first version ({data, timestep, shape})")
    c.add_argument("--steps", type=int, default=None, metavar="N",
                   help="denoising steps per latent (default 2 x time groups)")
    c.add_argument("--scheduler", choices=("ddpm", "ddim"), default=None)
    c.add_argument("--batch-size", type=int, default=8, metavar="N")
    c.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="quantize a generated model end to end (no files needed)")
    demo.add_argument("--output", default="demo-output", help="where to write (default demo-output)")
    demo.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    demo.add_argument("--size", default="10M", help="synthetic model size class (default 10M)")
    return parser


def _fmt_metric(v: Optional[float], spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return format(v, spec)


def _tensor_line(r: Any) -> str:
    shape = "x".join(str(d) for d in r.shape) or "scalar"
    if r.bits is None:
        return f"  {r.name:<48} {shape:<14} {r.dtype:<9} kept          ({r.reason})"
    return (f"  {r.name:<48} {shape:<14} {r.dtype:<9} int{r.bits:<2} "
            f"cos {_fmt_metric(r.cosine, '.6f')}  SQNR {_fmt_metric(r.sqnr_db, '6.2f')} dB  "
            f"max err {_fmt_metric(r.max_abs_error, '.2e')}"
            + (f"  [{'; '.join(r.decisions)}]" if r.decisions else ""))


def print_summary(s: Any) -> None:
    print(f"quantized {s.tensors} tensors ({s.quantized_tensors} quantized, "
          f"{s.params / 1e6:.2f}M params) in {s.seconds:.2f} s")
    print(f"  {format_size(s.input_bytes)} -> {format_size(s.output_bytes)}: compression "
          f"{s.compression_ratio:.2f}x, {s.bits_per_weight:.2f} bits per weight (parameters included)")
    if s.mean_cosine is not None:
        print(f"  cosine: mean {s.mean_cosine:.6f}, worst {s.min_cosine:.6f} ({s.worst_tensor})")
    print(f"  modality {s.modality}; output {s.output} ({', '.join(s.files)})")


def _thresholds(items: Optional[Sequence[str]]) -> Optional[Dict[int, float]]:
    if not items:
        return None
    out: Dict[int, float] = {}
    for item in items:
        try:
            b, c = item.split("=")
            out[int(b)] = float(c)
        except ValueError:
            raise ArrowQuantError(f"expected BITS=COSINE such as 4=0.95, got {item!r}") from None
    return out


def resolve_config(args: argparse.Namespace) -> Any:
    """The run's DiffusionQuantConfig: profile < --config file < ARROW_QUANT_* < flags."""
    from .config import resolve

    overrides = {
        "bit_width": args.bits, "group_size": args.group_size, "scheme": args.scheme,
        "method": args.method, "param_dtype": args.param_dtype, "num_threads": args.threads,
        "target_bpw": args.target_bpw, "enable_mixed_precision": args.mixed_precision,
        "keep_patterns": args.keep, "bits_for": args.bits_for,
        "skip_sensitive_layers": args.skip_sensitive,
        "fallback_thresholds": _thresholds(args.fallback_threshold),
        "fail_fast": args.fail_fast, "min_accuracy": args.min_accuracy,
        "modality": args.modality, "quantize_1d": args.quantize_1d,
        "enable_time_aware": args.time_aware, "enable_spatial": args.spatial,
    }
    return resolve(config_file=args.config, profile=args.profile, overrides=overrides)


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import api
    from .job import build_job

    job = build_job(args.input, args.output, config=resolve_config(args),
                    max_memory=args.max_memory, chunk_size=args.chunk_size,
                    shard_size=args.shard_size, output_format=args.format, engine=args.engine,
                    overwrite=args.overwrite, resume=args.resume, calibration=args.calibration,
                    gguf_type=args.gguf_type, gguf_arch=args.gguf_arch,
                    gguf_layout=args.gguf_layout, executor=args.executor,
                    ray_address=args.ray_address, ray_cpus_per_task=args.ray_cpus_per_task,
                    on_unit=(lambda u: print(u["message"], file=sys.stderr, flush=True))
                    if args.verbose else None)
    on_tensor = (lambda r: print(_tensor_line(r), flush=True)) if args.verbose else None
    summary = api.run_job(job, progress=False if (args.no_progress or args.json) else None,
                          on_tensor=on_tensor)
    if args.verbose and args.executor == "ray":
        from .run.ray_executor import worker_lines

        print("\n".join(worker_lines(summary.details)), file=sys.stderr)
    if args.json:
        print(dumps(summary.details if job.output_format == "gguf" and summary.details
                    else summary.as_dict(), indent=2))
    elif job.output_format == "gguf":
        from .formats.gguf.export import format_report

        print(format_report(summary.details, args.verbose))
    else:
        print_summary(summary)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import api

    info = api.inspect(args.path)
    if args.json:
        print(dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']}, modality {info.get('modality') or 'unknown'}, "
          f"{info['num_tensors']} tensors, {info['params'] / 1e6:.2f}M params, "
          f"{format_size(info['bytes'])}, {info['bits_per_weight']:.2f} bits per weight")
    if info["format"] == "gguf":
        print(f"  architecture {info.get('architecture') or 'none'}; types: " + ", ".join(
            f"{name} {d['tensors']} tensors {d['bits_per_weight']:.2f} bpw"
            for name, d in sorted(info["types"].items())))
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"]) or "scalar"
        bpw = "-" if t.get("bits_per_weight") is None else f"{t['bits_per_weight']:.2f}"
        size = "-" if t.get("bytes") is None else format_size(t["bytes"])
        params = t.get("param_dtype") or "-"
        print(f"  {t['name']:<52} {shape:<16} {t['dtype']:<9} {t['quant_type']:<5} "
              f"{params:<10} {bpw:>6} bpw {size:>10}")
    return 0


def _parse_thresholds(items: Sequence[str]) -> Dict[int, float]:
    from .planning.plan import DEFAULT_MIN_COSINE

    return {**DEFAULT_MIN_COSINE, **(_thresholds(items) or {})}


def cmd_validate(args: argparse.Namespace) -> int:
    from . import api

    report = api.validate(args.original, args.quantized, _parse_thresholds(args.threshold))
    if args.report:
        report.save(args.report)
    if args.json:
        print(dumps(report.as_dict(), indent=2))
    else:
        for l in report.layers:
            mark = "ok  " if l.passed else "FAIL"
            print(f"  {mark} {l.name:<48} {l.quant_type:<5} cos {l.cosine:.6f} "
                  f"SQNR {_fmt_metric(l.sqnr_db, '6.2f')} dB  max err {l.max_abs_error:.2e}")
        failed = sum(not l.passed for l in report.layers)
        print(f"{'PASS' if report.passed else 'FAIL'}: {len(report.layers)} layers, {failed} "
              f"below threshold, mean cosine {report.mean_cosine:.6f}")
    return 0 if report.passed else 1


def cmd_dequantize(args: argparse.Namespace) -> int:
    from . import api

    out = api.dequantize(args.quantized, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from .config import parse_bits_for
    from .formats.gguf.export import export_gguf, format_report

    report = export_gguf(args.input, args.output, bits=args.bits, scheme=args.scheme,
                         gguf_type=args.gguf_type, threads=args.threads, overwrite=args.overwrite,
                         arch=args.gguf_arch, layout=args.gguf_layout,
                         max_memory=args.max_memory, keep=args.keep or (),
                         bits_for=parse_bits_for(args.bits_for), target_bpw=args.target_bpw,
                         calibration=args.calibration,
                         progress=False if (args.no_progress or args.json) else None)
    print(dumps(report, indent=2) if args.json else format_report(report, args.verbose))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate, load_stats

    out = calibrate(args.model, args.out, num_time_groups=args.num_time_groups,
                    samples=args.samples, inputs=args.inputs, steps=args.steps,
                    scheduler=args.scheduler, batch_size=args.batch_size, seed=args.seed)
    stats = load_stats(out)
    print(f"wrote {out}: {len(stats.layers)} layers, {stats.num_time_groups} time group(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import api
    from .synthetic import generate_model

    cache = Path(args.output) / "source"
    print(f"generating a synthetic {args.size} float16 transformer (Parquet V1) in {cache} ...")
    model = generate_model(cache, size=args.size, fmt="parquet", seed=0)
    out = Path(args.output) / f"int{args.bits}"
    print(f"quantizing to INT{args.bits}, group size 128, into {out}:")
    summary = api.quantize(model, out, bits=args.bits, overwrite=out.exists(), progress=False,
                           on_tensor=lambda r: print(_tensor_line(r), flush=True))
    print_summary(summary)
    print(f"report: {summary.report_path}")
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "inspect": cmd_inspect,
    "validate": cmd_validate,
    "dequantize": cmd_dequantize,
    "export-gguf": cmd_export_gguf,
    "calibrate": cmd_calibrate,
    "demo": cmd_demo,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except ArrowQuantError as exc:
        print(f"arrowquant {args.command}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output stopped early (`arrowquant inspect M | head`):
        # not a failure. Point stdout at /dev/null so the exit flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # the system refused a read or write outside the engine's wrapping
        print(f"arrowquant {args.command}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line, the traceback in a file
        saved = save_traceback(exc)
        print(f"arrowquant {args.command}: internal error: {type(exc).__name__}: "
              f"{printable(exc)}; full traceback in {saved} (please report it)", file=sys.stderr)
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
