"""The public operations on model files: quantize, load, inspect, validate,
dequantize. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

import numpy as np

from . import __version__ as _version
from . import parquet_v2
from .errors import (
    ArrowQuantError,
    ConfigurationError,
    FormatError,
    MetadataError,
    ModelNotFoundError,
    QuantizationError,
    ShapeMismatchError,
    ValidationError,
)
from .pipeline import (
    LOCK_NAME,
    STAGING,
    OutputLock,
    PipelineOptions,
    StreamingQuantizer,
    TensorRecord,
    _atomic_write_text,
    check_memory_budget,
    default_plans,
    lean_allocators,
)
from .plan import DEFAULT_MIN_COSINE, Planner
from .sources import WEIGHT_SUFFIXES, ModelSource, is_pipeline_dir, is_v2_dir, open_model
from .tensor import check_spec
from .units import format_size

if TYPE_CHECKING:
    from .config import DiffusionQuantConfig

PathLike = Union[str, os.PathLike]
DEFAULT_MAX_MEMORY = "256MiB"
ProgressArg = Union[None, bool, Callable[[str, float], Any]]


@dataclass
class QuantizeSummary:
    """The outcome of one quantize run (also the `summary` of metadata.json)."""

    output: str
    source: str
    source_format: str
    output_format: str
    modality: str
    bits: int
    tensors: int
    quantized_tensors: int
    params: int
    input_bytes: int
    output_bytes: int
    compression_ratio: float
    mean_cosine: Optional[float]
    min_cosine: Optional[float]
    worst_tensor: Optional[str]
    bits_per_weight: float
    seconds: float
    files: List[str] = field(default_factory=list)
    records: List[TensorRecord] = field(default_factory=list, repr=False)

    @property
    def report_path(self) -> Path:
        return Path(self.output) / "quantization_report.json"

    def as_dict(self, with_records: bool = False) -> Dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}
        if with_records:
            d["tensors_detail"] = [r.as_dict() for r in self.records]
        return d


def _progress_fn(progress: ProgressArg, total_bytes: int) -> Optional[Callable[[str, float], None]]:
    """A (message, fraction) callback: tqdm on a terminal, the user's callable,
    or nothing. Exceptions raised by a user callback are reported, not fatal."""
    if progress is False:
        return None
    if callable(progress):
        user = progress

        def call(message: str, fraction: float) -> None:
            try:
                user(message, fraction)
            except Exception as exc:  # a broken callback must not kill an hour-long run
                warnings.warn(f"progress callback raised {type(exc).__name__}: {exc}", RuntimeWarning)

        return call
    if progress is None and not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="quantize", dynamic_ncols=True, file=sys.stderr)

    def update(message: str, fraction: float) -> None:
        target = int(fraction * total_bytes)
        bar.update(max(0, target - bar.n))
        bar.set_postfix_str(message[:60], refresh=False)
        if fraction >= 1.0:
            bar.close()

    return update


def _prepare_output(out: Path, overwrite: bool, resume: bool, check_only: bool = False) -> None:
    """Refuses an output that exists (unless overwrite / resume allow it) and,
    unless check_only, empties it for --overwrite and creates it."""
    if out.exists() and not out.is_dir():
        raise ArrowQuantError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        ours = (out / "metadata.json").exists() or (out / STAGING).exists() or (out / LOCK_NAME).exists()
        if resume:
            if not (out / STAGING).exists():
                raise ArrowQuantError(f"{out}: exists but holds no interrupted ArrowQuant run to "
                                      "resume")
            return
        if not overwrite:
            raise ArrowQuantError(f"{out}: already exists; pass --overwrite to replace it or "
                                  "--resume to finish an interrupted run")
        if not ours:
            raise ArrowQuantError(f"{out}: exists and does not look like ArrowQuant output; "
                                  "refusing to delete it (choose another output path)")
        if check_only:
            return
        lock = OutputLock(out)
        lock.acquire()  # refuse to delete what a live run is writing
        try:
            for child in out.iterdir():
                if child.name == LOCK_NAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        finally:
            lock.release()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


def _fingerprint(source: ModelSource) -> List[List[Any]]:
    out = []
    for p in source.weight_files:
        st = Path(p).stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _detect_modality(source: ModelSource, explicit: Optional[str]) -> Dict[str, Any]:
    from .modality import detect_modality

    decision = detect_modality(source.root, [t.name for t in source.tensors],
                               metadata=source.metadata, config=explicit)
    return decision.as_dict()


def quantize(
    input: PathLike,
    output: PathLike,
    *,
    bits: int = 4,
    group_size: int = 128,
    scheme: str = "asymmetric",
    method: str = "mse",
    param_dtype: str = "float16",
    threads: int = 0,
    max_memory: Union[str, int] = "256MiB",  # DEFAULT_MAX_MEMORY
    chunk_size: Union[str, int] = "256MiB",
    shard_size: Union[str, int] = "2GiB",
    overwrite: bool = False,
    resume: bool = False,
    quantize_1d: bool = False,
    output_format: str = "parquet",
    engine: str = "native",
    planner: Optional[Planner] = None,
    fallback: bool = False,
    fail_fast: bool = False,
    min_cosine: Optional[Dict[int, float]] = None,
    modality: Optional[str] = None,
    progress: ProgressArg = None,
    on_tensor: Optional[Callable[[TensorRecord], None]] = None,
    cancel: Optional[threading.Event] = None,
    config_dict: Optional[Dict[str, Any]] = None,
    config: Optional["DiffusionQuantConfig"] = None,
    gguf_type: Optional[str] = None,
    gguf_arch: str = "auto",
    calibration: Any = None,
    equalization: bool = True,
    importance_mode: str = "max",
) -> Union[QuantizeSummary, Dict[str, Any]]:
    """Quantizes the model at `input` into an ArrowQuant Parquet V2 directory.

    Streams tensor by tensor in row chunks; `max_memory` bounds the pipeline's
    buffers. `fallback=True` redoes a layer at the next width when its cosine
    falls below `min_cosine[bits]` (default 2: 0.70, 4: 0.90, 8: 0.95).

    With `config` (a DiffusionQuantConfig) the diffusion-aware planner decides
    each layer (timestep layers at INT8+, rules, mixed precision, per-layer
    fallback), the config's values replace bits / group_size / scheme /
    method / param_dtype / threads / fail_fast / modality, and a mean cosine
    below `config.min_accuracy` is reported (an error under fail_fast).

    `calibration` (a statistics file from `arrowquant calibrate`, or loaded
    CalibrationStats) turns on importance-weighted scales for the layers it
    covers, with per-layer channel equalization when `equalization` is on;
    `importance_mode` "max" keeps every timestep group's salient channels,
    "mean" pools them (with a config: enable_time_aware / enable_spatial).
    """
    requested = config.param_dtype if config is not None else param_dtype
    if calibration is not None and requested == "superblock" and output_format != "gguf":
        # Checked first: a diffusers pipeline would quantize components before
        # reaching the one the statistics are for.
        raise ValidationError(
            "calibrated (importance-weighted) quantization does not support param dtype "
            "'superblock'; use float16 or float32 parameters with --calibration")
    if output_format == "gguf" and requested == "superblock":
        raise ConfigurationError(
            "GGUF output uses llama.cpp's block types (Q8_0 / Q4_0 / Q4_1: blocks of 32 with "
            "float16 parameters); param dtype 'superblock' is an ArrowQuant Parquet V2 format: "
            "drop --param-dtype or write Parquet")
    if output_format == "gguf":
        # One GGUF file, block types from bits / scheme (gguf_export's rules);
        # returns export_gguf's report dict.
        from .gguf_export import export_gguf

        if config is not None:
            bits, scheme, threads = config.bit_width, config.scheme, config.num_threads
        return export_gguf(input, output, bits=bits, scheme=scheme, gguf_type=gguf_type,
                           threads=threads, overwrite=overwrite, progress=progress,
                           arch=gguf_arch)
    if is_pipeline_dir(Path(input)):
        return _quantize_pipeline(
            Path(input), Path(output), overwrite=overwrite, resume=resume, progress=progress,
            t0=time.perf_counter(),
            options=dict(bits=bits, group_size=group_size, scheme=scheme, method=method,
                         param_dtype=param_dtype, threads=threads, max_memory=max_memory,
                         chunk_size=chunk_size, shard_size=shard_size, quantize_1d=quantize_1d,
                         engine=engine, planner=planner, fallback=fallback, fail_fast=fail_fast,
                         min_cosine=min_cosine, modality=modality, on_tensor=on_tensor,
                         cancel=cancel, config_dict=config_dict, config=config,
                         equalization=equalization, importance_mode=importance_mode),
            calibration=calibration)
    if config is not None:
        return _quantize_with_config(input, output, config, planner=planner, max_memory=max_memory,
                                     chunk_size=chunk_size, shard_size=shard_size,
                                     overwrite=overwrite, resume=resume,
                                     output_format=output_format, engine=engine,
                                     progress=progress, on_tensor=on_tensor, cancel=cancel,
                                     config_dict=config_dict, calibration=calibration)
    if output_format not in ("parquet", "gguf"):
        raise ConfigurationError(f"output format must be 'parquet' or 'gguf', got {output_format!r}")
    if overwrite and resume:
        raise ConfigurationError("--overwrite and --resume exclude each other")
    check_spec(bits, group_size, scheme, method, param_dtype)
    opts = PipelineOptions(threads=threads, max_memory=max_memory, chunk_size=chunk_size,
                           shard_size=shard_size, engine=engine, fail_fast=fail_fast)
    t0 = time.perf_counter()
    out = Path(output)
    if resume and (out / "metadata.json").exists():
        # Finished: every model file was in place before metadata.json was
        # written. Only a leftover staging folder (a stop during cleanup) remains.
        shutil.rmtree(out / STAGING, ignore_errors=True)
        return finished_summary(out)
    _prepare_output(out, overwrite, resume, check_only=True)  # fail before any work
    with lean_allocators(), open_model(input) as source:
        report = _progress_fn(progress, source.total_bytes)
        modality_info = _detect_modality(source, modality)
        opts.modality = modality_info["modality"]
        opts.is_diffusion_model = opts.modality in ("image", "audio") or bool(
            source.metadata.get("is_diffusion_model"))
        if report and planner is not None:
            report(f"planning {len(source.tensors)} tensors", 0.0)
        plans = default_plans(
            source, planner, bits=bits, group_size=group_size, scheme=scheme, method=method,
            param_dtype=param_dtype, quantize_1d=quantize_1d, fallback=fallback or fail_fast,
            min_cosine=dict(min_cosine or DEFAULT_MIN_COSINE),
        )
        if calibration is not None:
            from .calibrated import apply_calibration

            if report:
                report("calibrated planning (importance, equalization)", 0.0)
            apply_calibration(plans, source.tensors, _stats(calibration), source,
                              equalization=equalization, importance_mode=importance_mode,
                              threads=threads)
        config = {
            "bits": bits, "group_size": group_size, "scheme": scheme, "method": method,
            "param_dtype": param_dtype, "quantize_1d": quantize_1d, "engine": engine,
            "chunk_size": opts.chunk_size, "fallback": fallback, "fail_fast": fail_fast,
            "min_cosine": {str(k): v for k, v in (min_cosine or DEFAULT_MIN_COSINE).items()},
            "planner": type(planner).__name__ if planner else "RulePlanner",
            "calibration": _calibration_label(calibration),
            "equalization": equalization if calibration is not None else None,
            **(config_dict or {}),
        }
        check_memory_budget(source.tensors, plans, opts)
        _prepare_output(out, overwrite, resume)
        lock = OutputLock(out)
        lock.acquire()
        try:
            summary = _run_locked(source, plans, out, opts, config, modality_info, report,
                                  on_tensor, cancel, t0, bits)
        finally:
            lock.release(remove=(out / "metadata.json").exists())
    return summary


def _run_locked(source: ModelSource, plans: Dict[str, Any], out: Path, opts: PipelineOptions,
                config: Dict[str, Any], modality_info: Dict[str, Any],
                report: Optional[Callable[[str, float], None]],
                on_tensor: Optional[Callable[[TensorRecord], None]],
                cancel: Optional[threading.Event], t0: float, bits: int) -> QuantizeSummary:
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    run_file = staging / "run.json"
    fingerprint = _fingerprint(source)
    run_info = {"source": str(Path(source.root).resolve()), "config": config,
                "fingerprint": fingerprint}
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("config") != config or previous.get("source") != run_info["source"]:
            raise ConfigurationError(
                f"{out}: the interrupted run used other settings or another input "
                f"({previous.get('source')}); resume with the same ones, or --overwrite")
        if previous.get("fingerprint") != fingerprint:
            raise FormatError(f"{out}: the input files changed since the interrupted run started; "
                              "start again with --overwrite")
    else:
        _atomic_write_text(run_file, json.dumps(run_info, indent=2))

    runner = StreamingQuantizer(source, plans, out, opts,
                                progress=report,
                                on_tensor=on_tensor, cancel=cancel)
    records = runner.run()
    if _fingerprint(source) != fingerprint:
        raise FormatError(f"{source.root}: input files changed while they were being read; "
                          "the output was not finished")
    files = runner.finish()
    for extra in source.extra_files:
        tmp = out / (extra.name + ".tmp")
        shutil.copy2(extra, tmp)
        os.replace(tmp, out / extra.name)

    seconds = time.perf_counter() - t0
    quantized = [r for r in records if r.bits is not None]
    cosines = [r.cosine for r in quantized if r.cosine is not None]
    worst = min(quantized, key=lambda r: r.cosine if r.cosine is not None else 1.0) if quantized else None
    params = sum(r.num_params for r in records)
    in_bytes = sum(r.input_bytes for r in records)
    out_bytes = sum(r.output_bytes for r in records)
    summary = QuantizeSummary(
        output=str(out), source=str(source.root), source_format=source.format,
        output_format="arrowquant-parquet-v2", modality=modality_info["modality"], bits=bits,
        tensors=len(records), quantized_tensors=len(quantized), params=params,
        input_bytes=in_bytes, output_bytes=out_bytes,
        compression_ratio=in_bytes / out_bytes if out_bytes else 0.0,
        mean_cosine=float(np.mean(cosines)) if cosines else None,
        min_cosine=float(min(cosines)) if cosines else None,
        worst_tensor=worst.name if worst else None,
        bits_per_weight=8.0 * out_bytes / params if params else 0.0,
        seconds=seconds, files=files, records=records,
    )
    report = {"format": parquet_v2.FORMAT_NAME, "tool_version": _version,
              "tensors": [r.as_dict() for r in records]}
    _atomic_write_text(out / "quantization_report.json", json.dumps(report, indent=2))
    metadata = {
        "format": parquet_v2.FORMAT_NAME,
        "format_version": parquet_v2.format_version(
            any(p.bits and p.param_dtype == "superblock" for p in plans.values())),
        "modality": modality_info["modality"],
        "modality_detection": modality_info,
        "is_diffusion_model": opts.is_diffusion_model,
        "source": {"path": str(source.root), "format": source.format},
        "quantization": config,
        "tool": {"name": "arrowquant", "version": _version},
        "files": files,
        "summary": summary.as_dict(),
    }
    _atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2))  # last: done
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def _stats(calibration: Any) -> Any:
    """CalibrationStats from a statistics file path (or as given)."""
    if isinstance(calibration, (str, os.PathLike)):
        from .calibration import load_stats

        stats = load_stats(calibration)
        stats.metadata["stats_path"] = str(Path(calibration).resolve())
        return stats
    return calibration


def _calibration_label(calibration: Any) -> Optional[str]:
    """What the report and run.json say of the statistics used."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        return str(Path(calibration).resolve())
    meta = getattr(calibration, "metadata", {}) or {}
    return meta.get("stats_path") or f"statistics of {meta.get('model', 'an unnamed model')}"


def _quantize_with_config(input: PathLike, output: PathLike, config: "DiffusionQuantConfig", *,
                          planner: Optional[Planner], max_memory: Union[str, int],
                          calibration: Any = None, **kwargs: Any) -> QuantizeSummary:
    from .diffusion import DiffusionPlanner

    config.validate()
    stats = None if calibration is None else _stats(calibration)
    kwargs.pop("equalization", None)   # the config decides these
    kwargs.pop("importance_mode", None)
    if planner is None and not is_pipeline_dir(Path(input)):
        # A path, not an open source: the planner opens it only to measure.
        planner = DiffusionPlanner(config, stats=stats, source=input)
    if max_memory == DEFAULT_MAX_MEMORY and config.max_memory_limit_mb:
        max_memory = f"{config.max_memory_limit_mb}MiB"
    config_dict = {"config": config.to_dict(), **(kwargs.pop("config_dict") or {})}
    summary = quantize(
        input, output, bits=config.bit_width, group_size=config.group_size,
        scheme=config.scheme, method=config.method, param_dtype=config.param_dtype,
        threads=config.num_threads, quantize_1d=config.quantize_1d, planner=planner,
        fallback=True, fail_fast=config.fail_fast,
        min_cosine={b: c for b, c in config.fallback_thresholds.items() if c},
        modality=config.modality, max_memory=max_memory, config_dict=config_dict,
        calibration=stats, equalization=config.enable_spatial,
        importance_mode="max" if config.enable_time_aware else "mean", **kwargs)
    if summary.mean_cosine is not None and summary.mean_cosine < config.min_accuracy:
        message = (f"mean cosine {summary.mean_cosine:.4f} is below min_accuracy "
                   f"{config.min_accuracy}")
        if config.fail_fast:
            raise QuantizationError(f"{output}: {message} (fail_fast)")
        warnings.warn(f"{output}: {message}", RuntimeWarning)
    return summary


PIPELINE_FORMAT = "arrowquant-parquet-v2-pipeline"


def _has_weights(d: Path) -> bool:
    return any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir())


def _quantize_pipeline(src: Path, out: Path, *, overwrite: bool, resume: bool,
                       progress: ProgressArg, t0: float, options: Dict[str, Any],
                       calibration: Any = None) -> QuantizeSummary:
    """A diffusers pipeline (model_index.json + component folders): each
    component with weights becomes its own V2 directory under `out`; other
    folders and files are copied unchanged. metadata.json at the top is
    written last and lists the components."""
    if resume and (out / "metadata.json").exists():
        return finished_summary(out)
    _prepare_output(out, overwrite, resume)
    if not (out / STAGING).exists():
        (out / STAGING).mkdir()
    lock = OutputLock(out)
    lock.acquire()
    try:
        components = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
        quantized = [d for d in components if _has_weights(d)]
        # Statistics are recorded on the denoiser (what `arrowquant calibrate`
        # runs); applying them by name to another component would be wrong.
        names = [d.name for d in quantized]
        denoiser = next((n for n in ("unet", "transformer") if n in names), None)
        summaries: List[QuantizeSummary] = []
        for i, comp in enumerate(quantized):
            comp_out = out / comp.name
            comp_progress = progress
            if callable(progress):
                comp_progress = (lambda m, f, i=i, name=comp.name:
                                 progress(f"{name}/{m}", (i + f) / len(quantized)))
            if (comp_out / "metadata.json").exists() and resume:
                summaries.append(finished_summary(comp_out))
                continue
            summaries.append(quantize(
                comp, comp_out, resume=resume and comp_out.exists(),
                overwrite=not resume and comp_out.exists(), progress=comp_progress,
                calibration=calibration if comp.name == denoiser else None, **options))
        for comp in components:
            if comp not in quantized and not (out / comp.name).exists():
                shutil.copytree(comp, out / (comp.name + ".tmp"))
                os.replace(out / (comp.name + ".tmp"), out / comp.name)
        for f in src.iterdir():
            if f.is_file() and f.name != "metadata.json":
                shutil.copy2(f, out / (f.name + ".tmp"))
                os.replace(out / (f.name + ".tmp"), out / f.name)
        if not summaries:
            raise ModelNotFoundError(f"{src}: a diffusers pipeline with no component weights")
        summary = _combine(summaries, src, out, time.perf_counter() - t0)
        superblock = any(r.param_dtype == "superblock" for s in summaries for r in s.records)
        meta = {"format": PIPELINE_FORMAT, "format_version": parquet_v2.format_version(superblock),
                "components": [c.name for c in quantized],
                "copied": [c.name for c in components if c not in quantized],
                "modality": summary.modality, "tool": {"name": "arrowquant", "version": _version},
                "summary": summary.as_dict()}
        report = {"format": PIPELINE_FORMAT, "tensors": [
            {**r.as_dict(), "name": f"{c.name}/{r.name}"}
            for c, s in zip(quantized, summaries) for r in s.records]}
        _atomic_write_text(out / "quantization_report.json", json.dumps(report, indent=2))
        _atomic_write_text(out / "metadata.json", json.dumps(meta, indent=2))
        shutil.rmtree(out / STAGING, ignore_errors=True)
        return summary
    finally:
        lock.release(remove=(out / "metadata.json").exists())


def _combine(parts: List[QuantizeSummary], src: Path, out: Path, seconds: float) -> QuantizeSummary:
    records = [r for s in parts for r in s.records]
    cos = [r.cosine for r in records if r.cosine is not None]
    in_b = sum(s.input_bytes for s in parts)
    out_b = sum(s.output_bytes for s in parts)
    params = sum(s.params for s in parts)
    worst = min((r for r in records if r.cosine is not None), key=lambda r: r.cosine, default=None)
    modalities = {s.modality for s in parts} - {"unknown"}
    return QuantizeSummary(
        output=str(out), source=str(src), source_format="diffusers-pipeline",
        output_format=PIPELINE_FORMAT,
        modality="image" if "image" in modalities else (modalities.pop() if modalities else "unknown"),
        bits=parts[0].bits, tensors=len(records),
        quantized_tensors=sum(s.quantized_tensors for s in parts), params=params,
        input_bytes=in_b, output_bytes=out_b, compression_ratio=in_b / out_b if out_b else 0.0,
        mean_cosine=float(np.mean(cos)) if cos else None, min_cosine=min(cos) if cos else None,
        worst_tensor=worst.name if worst else None,
        bits_per_weight=8.0 * out_b / params if params else 0.0, seconds=seconds,
        files=[f"{p.output}/{f}" for p in parts for f in p.files], records=records)


def finished_summary(out: Path) -> QuantizeSummary:
    """The summary of a finished output directory, from its metadata.json."""
    meta = json.loads((out / "metadata.json").read_text())
    fields = {f.name for f in dataclasses.fields(QuantizeSummary)} - {"records"}
    summary = QuantizeSummary(**{k: v for k, v in meta["summary"].items() if k in fields})
    report = json.loads((out / "quantization_report.json").read_text())
    record_fields = {f.name for f in dataclasses.fields(TensorRecord)}
    summary.records = [TensorRecord(**{k: v for k, v in r.items() if k in record_fields})
                       for r in report["tensors"]]
    return summary


def load(path: PathLike) -> parquet_v2.QuantizedModel:
    """Opens an ArrowQuant V2 directory: a lazy Mapping name -> float32 array;
    `.raw(name)` gives packed codes and parameters, `.info(name)` the entry."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such directory")
    meta = p / "metadata.json"
    if meta.exists():
        info = parquet_v2.read_metadata(meta)
        if info.get("format") == PIPELINE_FORMAT:
            comps = ", ".join(f"{p / c}" for c in info.get("components", []))
            raise FormatError(f"{p}: a quantized diffusers pipeline; load one of its components: "
                              f"{comps}")
    return parquet_v2.QuantizedModel(p)


# ---------------------------------------------------------------- inspect


def inspect(path: PathLike) -> Dict[str, Any]:
    """What a model holds: format, modality and, per tensor, shape, dtype,
    quant type, bits per weight and size."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from .gguf_export import inspect_gguf

        return inspect_gguf(p)
    if p.is_dir() and is_v2_dir(p):
        model = load(p)
        report_path = p / "quantization_report.json"
        report: Any = {"tensors": []}
        if report_path.exists():
            try:
                report = json.loads(report_path.read_text())
            except ValueError as exc:
                raise MetadataError(f"{report_path}: invalid JSON ({exc})") from None
        rows = report.get("tensors", []) if isinstance(report, dict) else []
        by_name = {r["name"]: r for r in rows if isinstance(r, dict) and "name" in r}
        tensors = []
        for name, e in model.entries.items():
            r = by_name.get(name, {})
            numel = math.prod(e.shape)
            nbytes = r.get("output_bytes")
            tensors.append({
                "name": name, "shape": list(e.shape), "dtype": e.dtype, "quant_type": e.quant_type,
                "group_size": e.group_size, "scheme": e.scheme, "method": e.method,
                "param_dtype": e.param_dtype, "bytes": nbytes, "chunks": len(e.chunks),
                "bits_per_weight": (8.0 * nbytes / numel) if nbytes and numel else None,
            })
        total_params = sum(math.prod(e.shape) for e in model.entries.values())
        out_bytes = sum(t["bytes"] or 0 for t in tensors)
        return {"path": str(p), "format": parquet_v2.FORMAT_NAME,
                "modality": model.metadata.get("modality"), "tensors": tensors,
                "num_tensors": len(tensors), "params": total_params, "bytes": out_bytes,
                "bits_per_weight": 8.0 * out_bytes / total_params if total_params else 0.0,
                "files": [f.name for f in model.files],
                "summary": model.metadata.get("summary")}
    with open_model(p) as source:
        tensors = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "quant_type": "none",
                    "bytes": t.nbytes,
                    "bits_per_weight": 8.0 * t.nbytes / t.numel if t.numel else None}
                   for t in source.tensors]
        params = sum(t.numel for t in source.tensors)
        return {"path": str(p), "format": source.format, "modality": source.modality_hint,
                "tensors": tensors, "num_tensors": len(tensors), "params": params,
                "bytes": source.total_bytes,
                "bits_per_weight": 8.0 * source.total_bytes / params if params else 0.0,
                "files": [str(f) for f in source.weight_files]}


# ---------------------------------------------------------------- validate


@dataclass
class LayerCheck:
    name: str
    quant_type: str
    cosine: float
    rel_mse: float
    sqnr_db: float
    max_abs_error: float
    threshold: Optional[float]
    passed: bool


@dataclass
class ValidationReport:
    original: str
    quantized: str
    layers: List[LayerCheck]

    @property
    def passed(self) -> bool:
        return all(l.passed for l in self.layers)

    @property
    def mean_cosine(self) -> float:
        return float(np.mean([l.cosine for l in self.layers])) if self.layers else 1.0

    def as_dict(self) -> Dict[str, Any]:
        def clean(v: Any) -> Any:
            return v if not isinstance(v, float) or math.isfinite(v) else str(v)

        return {"original": self.original, "quantized": self.quantized, "passed": self.passed,
                "mean_cosine": self.mean_cosine,
                "failed": [l.name for l in self.layers if not l.passed],
                "layers": [{k: clean(v) for k, v in dataclasses.asdict(l).items()}
                           for l in self.layers]}

    def to_markdown(self) -> str:
        lines = [f"# Validation: {self.quantized}", "",
                 f"Original: `{self.original}`  ",
                 f"Result: **{'PASS' if self.passed else 'FAIL'}**, mean cosine "
                 f"{self.mean_cosine:.6f}, {sum(not l.passed for l in self.layers)} layer(s) failed",
                 "", "| layer | type | cosine | rel. MSE | SQNR dB | max abs err | threshold | ok |",
                 "|---|---|---|---|---|---|---|---|"]
        for l in self.layers:
            thr = "" if l.threshold is None else f"{l.threshold:.2f}"
            lines.append(f"| {l.name} | {l.quant_type} | {l.cosine:.6f} | {l.rel_mse:.3e} | "
                         f"{l.sqnr_db:.2f} | {l.max_abs_error:.3e} | {thr} | "
                         f"{'yes' if l.passed else 'NO'} |")
        return "\n".join(lines) + "\n"


def validate(original: PathLike, quantized: PathLike,
             thresholds: Optional[Dict[int, float]] = None) -> ValidationReport:
    """Compares every tensor of a quantized model with its original, one
    tensor at a time: cosine, relative MSE, SQNR, max error, and pass/fail
    against the cosine threshold of its bit width (unquantized: exact)."""
    from .reference import to_float32
    from .tensor import ErrorSums

    thresholds = dict(thresholds or DEFAULT_MIN_COSINE)
    if Path(quantized).suffix == ".gguf" and Path(quantized).is_file():
        from .formats.gguf.validate import validate_gguf

        return validate_gguf(original, quantized, thresholds)
    model = load(quantized)
    layers: List[LayerCheck] = []
    with open_model(original) as source:
        names = {t.name for t in source.tensors}
        missing = [n for n in model.entries if n not in names]
        if missing:
            raise FormatError(f"{quantized}: tensor {missing[0]!r} is not in {original}")
        for t in source.tensors:
            if t.name not in model.entries:
                raise FormatError(f"{quantized}: tensor {t.name!r} of the original is missing")
            e = model.info(t.name)
            if tuple(e.shape) != tuple(t.shape):
                raise ShapeMismatchError(f"{quantized}: tensor {t.name!r} has shape {list(e.shape)}, "
                                         f"the original {list(t.shape)}")
            raw = source.read(t.name)
            if t.is_float:
                x = to_float32(np.ascontiguousarray(raw), t.dtype).astype(np.float64)
            else:
                x = raw.view(_np_dtype(t.dtype)).astype(np.float64)
            y = model.dequantize(t.name, out_dtype=np.float64).reshape(-1)
            x = x.reshape(-1)
            err = x - y
            sums = ErrorSums(float(x @ x), float(y @ y), float(x @ y), float(err @ err),
                             float(np.abs(err).max()) if err.size else 0.0, int(x.size))
            m = sums.metrics()
            thr = thresholds.get(e.bits) if e.bits else None
            ok = (m.cosine >= thr) if thr is not None else bool(np.array_equal(x, y))
            layers.append(LayerCheck(t.name, e.quant_type, m.cosine, m.rel_mse, m.sqnr_db,
                                     m.max_abs_error, thr, ok))
    return ValidationReport(str(original), str(quantized), layers)


def _np_dtype(name: str) -> Any:
    return {"float64": np.float64, "int64": np.int64, "int32": np.int32, "int16": np.int16,
            "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}[name]


# ---------------------------------------------------------------- dequantize


def dequantize(quantized: PathLike, output: PathLike, dtype: str = "float16",
               overwrite: bool = False) -> Path:
    """Writes a V2 model back to a SafeTensors file (float16 or float32 for
    quantized tensors; unquantized tensors keep their dtype), tensor by tensor."""
    from .safetensors_io import SafeTensorsWriter

    if dtype not in ("float16", "float32"):
        raise ConfigurationError(f"dequantize dtype must be float16 or float32, got {dtype!r}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass --overwrite to replace it")
    model = load(quantized)
    np_out = np.float16 if dtype == "float16" else np.float32
    specs = []
    for name, e in model.entries.items():
        out_dtype = dtype if e.quant_type != "none" else e.dtype
        specs.append((name, out_dtype, tuple(e.shape)))
    writer = SafeTensorsWriter(out, specs, metadata={"format": "pt", "arrowquant_source": str(quantized)})
    try:
        for name, out_dtype, _shape in specs:
            e = model.info(name)
            # Chunk by chunk, in row order: memory holds one chunk, not the tensor.
            for loc in sorted(e.chunks, key=lambda c: c.row_start):
                if e.quant_type == "none":
                    writer.write(name, next(model._chunk_rows(e, [loc]))["data"])
                else:
                    values = model.dequantize_chunk(name, loc).astype(np_out)
                    writer.write(name, np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return out
