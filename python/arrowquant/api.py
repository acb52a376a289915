"""The public operations on model files: quantize, load, inspect, validate,
dequantize. The CLI is a thin layer over these; `quantize` builds one Job and
hands it to the runner (run/runner.py) or, for GGUF output, to the GGUF writer
(formats/gguf)."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from .config import DiffusionQuantConfig
from .files import check_separate
from .jsonfile import read_json
from .text import check_path_text
from .errors import (ArrowQuantError, ConfigurationError)
from .formats.safetensors_writer import SafeTensorsWriter
from .formats.v2_reader import QuantizedModel, open_v2
from .formats.v2_schema import FORMAT_NAME
from .job import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE, Job, build_job
from .planning.plan import DEFAULT_MIN_COSINE, Planner, RulePlanner
from .progress import ProgressArg
from .run.report import QuantizeSummary, TensorRecord
from .sources import is_v2_dir, open_model
from .spec import DEFAULT_SPEC, GRID_METHODS, WIDTH_DEFAULTS, QuantSpec, resolve_spec
from .validation import LayerCheck, ValidationReport, validate_v2  # noqa: F401 (re-exported)

PathLike = Union[str, os.PathLike]


def quantize(
    input: PathLike,
    output: PathLike,
    *,
    bits: int = DEFAULT_SPEC.bits,
    group_size: Optional[int] = None,
    scheme: str = DEFAULT_SPEC.scheme,
    method: Optional[str] = None,
    param_dtype: Optional[str] = None,
    threads: int = 0,
    max_memory: Union[None, str, int] = None,
    chunk_size: Union[str, int] = DEFAULT_CHUNK_SIZE,
    shard_size: Union[str, int] = DEFAULT_SHARD_SIZE,
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
    config: Optional[DiffusionQuantConfig] = None,
    gguf_type: Optional[str] = None,
    gguf_arch: str = "auto",
    calibration: Any = None,
    equalization: bool = True,
    importance_mode: str = "max",
    executor: str = "local",
    ray_address: Optional[str] = None,
    ray_cpus_per_task: int = 0,
) -> QuantizeSummary:
    """Quantizes the model at `input` into an ArrowQuant Parquet V2 directory
    (or, with output_format="gguf", one GGUF file).

    Streams tensor by tensor in row chunks; `max_memory` (default 256 MiB, or
    the config's max_memory_limit_mb) bounds the pipeline's buffers.

    With `config` (a DiffusionQuantConfig, e.g. from arrowquant.resolve_config)
    its values decide everything the keyword arguments bits / group_size /
    scheme / method / param_dtype / threads / quantize_1d / fail_fast /
    modality would; without one, those arguments make the config. Either way
    the diffusion-aware planner decides each layer (timestep layers at INT8+,
    --keep / --bits-for rules, mixed precision, per-layer fallback) unless
    `planner` is given. `fallback=True` redoes a layer at the next width when
    its cosine falls below `min_cosine[bits]` (default 2: 0.70, 4: 0.90, 8:
    0.95); a config carries its own floors (fallback_thresholds).

    `calibration` (a statistics file from `arrowquant calibrate`, or loaded
    CalibrationStats) turns on importance-weighted scales for the layers it
    covers, with per-layer channel equalization when `equalization` is on;
    `importance_mode` "max" keeps every timestep group's salient channels,
    "mean" pools them (with a config: enable_time_aware / enable_spatial).

    `executor="ray"` quantizes the chunks in Ray tasks (`ray_address`: a
    cluster, "auto" for the one `ray start` made, None for RAY_ADDRESS or a
    local one; `ray_cpus_per_task`, default the engine's thread count) and
    writes the same bytes as one machine (docs/ray.md).
    """
    if output_format == "gguf" and param_dtype == "superblock":
        raise ConfigurationError(
            "GGUF output uses llama.cpp's block types, whose parameters their layouts fix; "
            "param dtype 'superblock' is an ArrowQuant Parquet V2 format: drop param_dtype "
            "or write Parquet")
    if output_format == "gguf" and method in GRID_METHODS:
        raise ConfigurationError(
            f"GGUF output uses llama.cpp's block types; method {method!r} (a code grid with "
            "its own table) is an ArrowQuant Parquet V2 format: use gguf_type='IQ4_NL' / "
            "'IQ4_XS' for llama.cpp's non-uniform grids, or write Parquet")
    if config is None:
        if bits in WIDTH_DEFAULTS:  # what is not given follows the bit width (spec.default_spec)
            spec = resolve_spec(bits, group_size, scheme, method, param_dtype)
            group_size, method, param_dtype = spec.group_size, spec.method, spec.param_dtype
        QuantSpec(bits, group_size, scheme, method, param_dtype).validate()
        # Without a config the caller's keyword arguments are the whole
        # policy: one width for every 2-D float tensor (RulePlanner), floors
        # only with fallback / fail_fast.
        floors = dict(min_cosine or DEFAULT_MIN_COSINE)
        config = DiffusionQuantConfig(
            bit_width=bits, group_size=group_size, scheme=scheme, method=method,
            param_dtype=param_dtype, num_threads=threads, quantize_1d=quantize_1d,
            fail_fast=fail_fast, modality=modality, enable_spatial=equalization,
            enable_time_aware=importance_mode == "max", min_accuracy=0.0,
            fallback_thresholds=floors if (fallback or fail_fast) else {b: 0.0 for b in floors})
        if planner is None:
            planner = RulePlanner(bits=bits, group_size=group_size, scheme=scheme, method=method,
                                  param_dtype=param_dtype, quantize_1d=quantize_1d,
                                  fallback=fallback or fail_fast, min_cosine=floors)
    job = build_job(input, output, config=config, max_memory=max_memory, chunk_size=chunk_size,
                    shard_size=shard_size, output_format=output_format, engine=engine,
                    overwrite=overwrite, resume=resume, calibration=calibration, planner=planner,
                    gguf_type=gguf_type, gguf_arch=gguf_arch,
                    record_extra=dict(config_dict or {}), executor=executor,
                    ray_address=ray_address, ray_cpus_per_task=ray_cpus_per_task)
    return run_job(job, progress=progress, on_tensor=on_tensor, cancel=cancel)


def run_job(job: Job, progress: ProgressArg = None,
            on_tensor: Optional[Callable[[TensorRecord], None]] = None,
            cancel: Optional[threading.Event] = None) -> QuantizeSummary:
    """Runs a Job with the writer of its output format."""
    if job.output_format == "gguf":
        from .formats.gguf.export import quantize_to_gguf

        return quantize_to_gguf(job, progress=progress)
    from .run.runner import run

    return run(job, progress=progress, on_tensor=on_tensor, cancel=cancel)


def load(path: PathLike) -> QuantizedModel:
    """Opens an ArrowQuant V2 directory: a lazy Mapping name -> float32 array;
    `.raw(name)` gives packed codes and parameters, `.info(name)` the entry."""
    return open_v2(path)


# ---------------------------------------------------------------- inspect


def inspect(path: PathLike) -> Dict[str, Any]:
    """What a model holds: format, modality and, per tensor, shape, dtype,
    quant type, bits per weight and size."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from .formats.gguf.export import inspect_gguf

        return inspect_gguf(p)
    if p.is_dir() and is_v2_dir(p):
        model = load(p)
        report_path = p / "quantization_report.json"
        report: Any = {"tensors": []}
        if report_path.exists():
            from .run.report import REPORT_SCHEMA

            report = read_json(report_path, REPORT_SCHEMA)
        by_name = {r["name"]: r for r in report.get("tensors") or []}
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
        return {"path": str(p), "format": FORMAT_NAME,
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


def validate(original: PathLike, quantized: PathLike,
             thresholds: Optional[Dict[int, float]] = None) -> ValidationReport:
    """Compares every tensor of a quantized model (an ArrowQuant V2 directory
    or a GGUF file) with its original, one tensor at a time: cosine, relative
    MSE, SQNR, max error, and pass/fail against the cosine threshold of its
    bit width (unquantized: exact)."""
    thresholds = dict(thresholds or DEFAULT_MIN_COSINE)
    if Path(quantized).suffix == ".gguf" and Path(quantized).is_file():
        from .formats.gguf.validate import validate_gguf

        return validate_gguf(original, quantized, thresholds)
    return validate_v2(original, quantized, thresholds)


# ---------------------------------------------------------------- dequantize


def dequantize(quantized: PathLike, output: PathLike, dtype: str = "float16",
               overwrite: bool = False) -> Path:
    """Writes a V2 model back to a SafeTensors file (float16 or float32 for
    quantized tensors; unquantized tensors keep their dtype), tensor by tensor."""
    if dtype not in ("float16", "float32"):
        raise ConfigurationError(f"dequantize dtype must be float16 or float32, got {dtype!r}")
    out = Path(output)
    check_separate(Path(quantized), out)  # never over (or inside) the model being read
    check_path_text(out, "output path")
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ArrowQuantError(f"{out}: is a directory; give the path of the .safetensors file")
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
