"""GGUF export: a source model (SafeTensors, Parquet V1, or an ArrowQuant
Parquet V2 directory) written as a GGUF v3 file by the C++ streaming writer
(cpp/src/gguf.cc), tensor by tensor in row chunks, in bounded memory.
(Kept whole: the entry point, the raw plan and the writer loop with its
report are one path; the type rules live in types / presets / allocate.)

Type rules (per tensor, each decision is in the report with its reason):

* ``gguf_type`` given (Q8_0, Q4_0, Q4_1, F16, F32): that type; else
  ``bits=8`` -> Q8_0, ``bits=4`` with ``scheme="symmetric"`` -> Q4_0,
  ``bits=4`` with ``scheme="asymmetric"`` -> Q4_1.
* 0-D and 1-D tensors (biases, norms) are stored as F32, as llama.cpp's own
  converter does: they are tiny and ggml computes with them in float32.
* A block type (Q*) needs the row length (the last dimension) to be a
  multiple of 32. Other tensors fall back to a wider, lossless type: F16 when
  the source is float16, F32 otherwise (float32 and bfloat16 values do not
  all fit float16). ``fallback: true`` in the report marks them.
* Tensors that are not floating point (int64 position ids, ...) are skipped
  and listed under ``skipped``.
* More than 4 dimensions (ggml's limit): the leading dimensions are merged.

From an ArrowQuant V2 model the values are first dequantized (group-wise
INT2/4/8) and then requantized to the block type: two roundings, not a
lossless conversion; the report says so (``requantized_from``).

Architecture (``arch``): ``"auto"`` (default) writes, for a Hugging Face
model directory, what llama.cpp runs: its architecture, tensor names,
hyperparameters, tokenizer, Q/K permutation and F32 rules, planned in
formats/gguf/ (docs/gguf.md); a source without config.json is written as
below. ``"generic"``: the source's tensor names (HF / diffusers names), no
tokenizer; a valid GGUF v3 container that gguf-py and other GGUF readers
open, which llama.cpp cannot run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...version import __version__
from .allocate import diffusion_override, importance_from_calibration
from .diffusion import export_diffusion_gguf, is_diffusion_input
from .tables import (GGUF_PRESETS, BLOCK_SIZE, BLOCK_SIZES, BLOCK_TYPES, ERROR_BOUND, GGUF_TYPES,  # noqa: F401
                     TYPE_BYTES,
                     choose_type, type_bytes as _type_bytes)
from .reader import dequantize_bytes, dequantize_tensor, inspect_gguf, quantize_bytes, read_header  # noqa: F401 (re-exported)
from ...engine import core as _core
from ...engine.dtypes import QUANTIZABLE_DTYPES
from ...engine.metrics import ErrorSums
from ...engine.finite import with_location
from ...jsonfile import CONFIG_SCHEMA, read_json
from ...files import check_separate, remove_stale_temporaries
from ...errors import ArrowQuantError, ConfigurationError, ValidationError
from ...progress import progress_fn
from ...sizes import format_size
from ...sources import ModelSource, open_model

PathLike = Union[str, "os.PathLike[str]"]

ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 63  # ggml keeps tensor names in char[64]
DEFAULT_CHUNK_BYTES = 64 << 20

_LLAMA_KEYS: Sequence[Tuple[str, str, Sequence[str]]] = (
    # (GGUF key suffix, value type, config.json fields in order of preference)
    ("context_length", "uint32", ("max_position_embeddings",)),
    ("embedding_length", "uint32", ("hidden_size",)),
    ("block_count", "uint32", ("num_hidden_layers",)),
    ("feed_forward_length", "uint32", ("intermediate_size",)),
    ("attention.head_count", "uint32", ("num_attention_heads",)),
    ("attention.head_count_kv", "uint32", ("num_key_value_heads", "num_attention_heads")),
    ("attention.layer_norm_rms_epsilon", "float32", ("rms_norm_eps",)),
    ("rope.freq_base", "float32", ("rope_theta",)),
    ("vocab_size", "uint32", ("vocab_size",)),
)


def tensor_type(shape: Sequence[int], dtype: str, target: str) -> Tuple[Optional[str], str, bool]:
    """(type or None to skip, reason, fell_back) for one tensor (see the module doc)."""
    if dtype not in QUANTIZABLE_DTYPES:
        return None, f"skipped: dtype {dtype} is not floating point", False
    if len(shape) < 2:
        return "F32", f"{len(shape)}-D tensor kept as F32", target != "F32"
    if target in BLOCK_TYPES and int(shape[-1]) % BLOCK_SIZES[target] != 0:
        wide = "F16" if dtype == "float16" else "F32"
        return wide, (f"row length {shape[-1]} is not a multiple of {BLOCK_SIZES[target]}: "
                      f"{target} impossible, stored as {wide} (lossless from {dtype})"), True
    return target, f"{target} for every weight matrix", False


def gguf_shape(shape: Sequence[int]) -> Tuple[Tuple[int, ...], Optional[str]]:
    """The numpy-order shape written (0-D -> (1,), >4-D leading dims merged)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return (1,), "0-D tensor stored with shape [1]"
    if len(shape) > MAX_DIMS:
        lead = math.prod(shape[: len(shape) - MAX_DIMS + 1])
        new = (lead,) + shape[len(shape) - MAX_DIMS + 1:]
        return new, f"{len(shape)}-D tensor: leading dimensions merged to {list(new)} (ggml has 4)"
    return shape, None


def _config_metadata(root: Path, name: Optional[str]) -> Tuple[List[Tuple[str, str, Any]], str]:
    """general.* and architecture keys from config.json when present."""
    cfg: Dict[str, Any] = {}
    for candidate in (root / "config.json", root.parent / "config.json"):
        if candidate.is_file():
            cfg = read_json(candidate, CONFIG_SCHEMA)
            break
    arch = "llama" if cfg.get("model_type") == "llama" else "arrowquant"
    model_name = name or cfg.get("_name_or_path") or root.name or "model"
    md: List[Tuple[str, str, Any]] = [
        ("general.architecture", "string", arch),
        ("general.name", "string", str(model_name)),
    ]
    if arch == "llama":
        for key, vtype, fields in _LLAMA_KEYS:
            for field in fields:
                value = cfg.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    md.append((f"llama.{key}", vtype, float(value) if vtype == "float32" else int(value)))
                    break
        heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
        head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
        if head_dim:
            md.append(("llama.rope.dimension_count", "uint32", int(head_dim)))
    elif cfg.get("model_type"):
        md.append(("arrowquant.source_model_type", "string", str(cfg["model_type"])))
    return md, arch


def _progress(progress: Any, total: int) -> Optional[Callable[[str, float], None]]:
    return progress_fn(progress, total)


def export_gguf(source: Any, out_path: PathLike, *, bits: int = 4, scheme: str = "symmetric",
                gguf_type: Optional[str] = None, threads: int = 0, progress: Any = None,
                overwrite: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                name: Optional[str] = None, arch: str = "auto",
                type_rule: Any = None, layout: Optional[str] = None,
                max_memory: Any = "256MiB", keep: Sequence[str] = (),
                bits_for: Optional[Dict[str, int]] = None, target_bpw: Optional[float] = None,
                calibration: Any = None) -> Dict[str, Any]:
    """Writes the model at `source` (path, or an open ModelSource) to a GGUF v3
    file at `out_path`, streaming tensor by tensor in row chunks of at most
    `chunk_bytes` source bytes (one row at least). Returns the report dict.

    `arch="auto"` (default) writes what llama.cpp runs for a Hugging Face
    model directory (formats/gguf: llama.cpp names, hyperparameters,
    tokenizer, F32 where llama.cpp needs it; ConfigurationError for an
    architecture it cannot map); a source without config.json is written raw.
    `arch="generic"` always writes the raw export (source names). In the
    llama.cpp mode `type_rule` (formats.gguf.types.TypeRule) may replace the
    uniform type choice per tensor.

    A `gguf_type` that is a llama.cpp preset (Q4_K_M, Q5_K_M, Q3_K_S/M/L,
    Q4_K_S, Q5_K_S, Q2_K, Q6_K, Q8_0, IQ4_XS) chooses each tensor's type by
    llama.cpp's rules (formats/gguf/presets.py). `keep` patterns store
    tensors unquantized, `bits_for` {PATTERN: 2/4/8/16} pins a width,
    `target_bpw` picks each remaining tensor's type from its measured error
    under that many bits per weight over the file (formats/gguf/allocate.py).
    `calibration` (a statistics file or CalibrationStats) weights every
    block search by the mean squared input activation of each column (the
    role of llama.cpp's imatrix).

    The file appears only when complete (written under a temporary name and
    renamed); on any error the temporary file is removed. `progress` is a
    `(message, fraction)` callable (its exceptions become warnings), True for a
    progress bar, or None/False."""
    target = choose_type(bits, scheme, gguf_type)
    keep, bits_for = tuple(keep or ()), dict(bits_for or {})
    if layout is not None or (not isinstance(source, ModelSource) and is_diffusion_input(source)):
        # Diffusion models: the layouts stable-diffusion.cpp / ComfyUI-GGUF read.
        return export_diffusion_gguf(source, out_path, gguf_type=target, layout=layout or "sdcpp",
                                     threads=threads, max_memory=max_memory,
                                     overwrite=overwrite, progress=progress, name=name,
                                     type_override=diffusion_override(keep, bits_for),
                                     target_bpw=target_bpw, calibration=calibration)
    from .presets import MIX_PRESETS

    preset = target if gguf_type is not None and target in MIX_PRESETS else None
    out = Path(out_path)
    if out.is_dir():
        raise ArrowQuantError(f"{out}: is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        raise ArrowQuantError(f"{out.parent}: output directory does not exist")
    if isinstance(source, (str, os.PathLike)):
        check_separate(Path(source), out)
    remove_stale_temporaries(out.parent, out.name)  # a killed earlier run's NAME.tmp-PID
    if chunk_bytes <= 0:
        raise ConfigurationError(f"chunk_bytes must be positive, got {chunk_bytes}")

    t0 = time.perf_counter()
    own = not isinstance(source, ModelSource)
    src = open_model(source) if own else source
    try:
        from .plan import TypeOptions, plan_file

        importance = importance_from_calibration(calibration)
        opts = TypeOptions(preset=preset, keep=keep, bits_for=bits_for, target_bpw=target_bpw,
                           importance=importance, threads=threads)
        llama = plan_file(src, arch, target, type_rule=type_rule, name=name, options=opts)
        if llama is None:
            if target in GGUF_PRESETS:
                raise ConfigurationError(
                    f"GGUF preset {target} is a per-tensor mix of llama.cpp's rules, which need "
                    f"a model llama.cpp runs (a Hugging Face directory, --gguf-arch auto); for "
                    f"this model write one type (--gguf-type "
                    f"{', '.join(t for t in GGUF_TYPES if t not in ('F16', 'F32'))})")
            if keep or bits_for or target_bpw is not None or calibration is not None:
                raise ConfigurationError(
                    "--keep, --bits-for, --target-bpw and --calibration need a model llama.cpp "
                    "runs (a Hugging Face directory with config.json, --gguf-arch auto); the raw "
                    "export writes one type")
        return _export(src, out, target, bits, scheme, gguf_type, threads, progress, chunk_bytes,
                       name, t0, llama, importance)
    finally:
        if own:
            src.close()


def _generic_plan(src: Any, target: str, name: Optional[str]
                  ) -> Tuple[List[Tuple[str, str, Any]], str, List[Dict[str, Any]],
                             List[Dict[str, str]]]:
    """Today's raw export: the source's names, types from tensor_type()."""
    root = Path(src.root)
    metadata, arch = _config_metadata(root if root.is_dir() else root.parent, name)
    plan: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    for t in src.tensors:
        ttype, reason, fell_back = tensor_type(t.shape, t.dtype, target)
        if ttype is None:
            skipped.append({"name": t.name, "reason": reason})
            continue
        if t.numel == 0:
            skipped.append({"name": t.name, "reason": "skipped: empty tensor"})
            continue
        plan.append({"info": t, "name": t.name, "type": ttype, "reason": reason,
                     "fallback": fell_back, "shape": tuple(t.shape), "row_order": None,
                     "data": None, "transform": None, "kind": None})
    return metadata, arch, plan, skipped


def _llama_plan(src: Any, llama: Any) -> Tuple[List[Tuple[str, str, Any]], str,
                                                List[Dict[str, Any]], List[Dict[str, str]]]:
    """formats.gguf's FilePlan as the writer loop's entries."""
    from ...sources.base import TensorInfo

    plan: List[Dict[str, Any]] = []
    for p in llama.tensors:
        t = p.tensor
        if t.data is not None:
            info = TensorInfo(name=t.name, shape=tuple(t.data.shape), dtype="float32",
                              nbytes=int(t.data.nbytes))
        else:
            info = src.info(t.source)
        plan.append({"info": info, "name": t.name, "type": p.choice.type,
                     "reason": p.choice.reason, "fallback": p.choice.fallback,
                     "shape": tuple(t.shape), "row_order": t.row_order, "data": t.data,
                     "transform": t.transform, "kind": getattr(t.kind, "name", None),
                     "tensor": t})
    skipped = [{"name": t.source, "reason": t.skip_reason} for t in llama.skipped]
    return list(llama.metadata), llama.arch.arch, plan, skipped


def _export(src: Any, out: Path, target: str, bits: int, scheme: str, gguf_type: Optional[str],
            threads: int, progress: Any, chunk_bytes: int, name: Optional[str],
            t0: float, llama: Any = None, importance: Any = None) -> Dict[str, Any]:
    root = Path(src.root)
    if llama is None:
        metadata, arch, entries, skipped = _generic_plan(src, target, name)
    else:
        metadata, arch, entries, skipped = _llama_plan(src, llama)
    requantized_from = None
    if src.format == "arrowquant-parquet-v2":
        q = src.metadata.get("quantization", {})
        requantized_from = (f"arrowquant-parquet-v2 (int{q.get('bits', '?')}, group size "
                            f"{q.get('group_size', '?')}): dequantized to float32, then "
                            f"requantized to {target}")

    plan: List[Dict[str, Any]] = []
    specs: List[Tuple[str, List[int], str]] = []
    warnings_out: List[str] = []
    if llama is None and arch == "arrowquant" and not (root / "config.json").is_file() \
            and not (root.parent / "config.json").is_file():
        warnings_out.append("no config.json: written with the source's tensor names "
                            "(architecture 'arrowquant'), which llama.cpp cannot run")
    if llama is not None:
        warnings_out += llama.warnings
    for e in entries:
        shape, shape_note = gguf_shape(e["shape"])
        if shape_note:
            e["reason"] = f"{e['reason']}; {shape_note}"
        if len(e["name"].encode()) > MAX_NAME_BYTES:
            warnings_out.append(f"tensor {e['name']!r}: name longer than {MAX_NAME_BYTES} bytes; "
                                "valid GGUF, but ggml-based loaders (llama.cpp) refuse it")
        specs.append((e["name"], list(shape), e["type"]))
        e["shape"] = shape
        plan.append(e)

    main_type, file_type = _file_type(target, plan, llama)
    metadata += [
        ("general.alignment", "uint32", ALIGNMENT),
        ("general.quantization_version", "uint32", 2),
        ("general.file_type", "uint32", file_type),
        ("arrowquant.version", "string", _version()),
        ("arrowquant.source_format", "string", str(src.format)),
    ]
    if requantized_from:
        metadata.append(("arrowquant.requantized_from", "string", requantized_from))

    total_in = sum(p["info"].nbytes for p in plan)
    report_progress = _progress(progress, max(total_in, 1))
    writer = _core.GgufWriter(str(out), metadata, specs, ALIGNMENT)
    records: List[Dict[str, Any]] = []
    done_bytes = 0
    buf: Optional[np.ndarray] = None
    try:
        for p in plan:
            t = p["info"]
            t_start = time.perf_counter()
            rows, cols = t.rows, t.cols
            # The writer's 2-D view follows the written shape: a merged >4-D
            # shape has more, shorter rows (a whole number per source row).
            w_rows = p["shape"][0] if len(p["shape"]) >= 2 else 1
            w_cols = t.numel // w_rows
            per_row = cols // w_cols
            row_bytes = max(1, t.nbytes // max(rows, 1))
            rows_per_chunk = max(1, min(rows, chunk_bytes // row_bytes))
            need = rows_per_chunk * row_bytes
            if buf is None or buf.size < need:
                buf = None  # drop the old buffer before taking the larger one
                buf = np.empty(need, dtype=np.uint8)
            sums = ErrorSums()
            chunks = 0
            weighted = False
            if importance is not None and p["type"] in BLOCK_TYPES and p.get("tensor") is not None:
                w = importance(p["tensor"])
                if w is not None:
                    writer.set_tensor_options("search", np.ascontiguousarray(w, np.float32))
                    weighted = True
            for r0 in range(0, rows, rows_per_chunk):
                n = min(rows_per_chunk, rows - r0)
                if p["data"] is not None:
                    raw = p["data"].reshape(-1).view(np.uint8)
                elif p["row_order"] is not None:
                    raw = _read_permuted(src, t, p["row_order"], r0, n, row_bytes)
                else:
                    raw = src.read(t.name, r0, n, out=buf[: n * row_bytes])
                try:
                    part = writer.append_rows(np.ascontiguousarray(raw), t.dtype, n * per_row,
                                              w_cols, threads)
                except ValidationError as exc:  # the engine placed it in the tensor; add the file
                    raise ValidationError(with_location(str(exc), src.location(t.name))) from None
                sums.merge(ErrorSums(*part))
                chunks += 1
                done_bytes += n * row_bytes
                if report_progress is not None:
                    report_progress(t.name, done_bytes / max(total_in, 1))
            m = sums.metrics()
            nbytes = _type_bytes(p["type"], t.numel)
            records.append({
                "name": p["name"], "source_name": None if p["data"] is not None else t.name,
                "kind": p["kind"], "transform": p["transform"],
                "shape": list(t.shape), "gguf_dims": list(reversed(p["shape"])),
                "source_dtype": t.dtype, "gguf_type": p["type"], "reason": p["reason"],
                "fallback": p["fallback"], "input_bytes": t.nbytes, "output_bytes": nbytes,
                "chunks": chunks, "cosine": m.cosine, "rel_mse": m.rel_mse,
                "sqnr_db": m.sqnr_db if math.isfinite(m.sqnr_db) else None,
                "max_abs_error": m.max_abs_error, "importance_weighted": weighted,
                "seconds": time.perf_counter() - t_start,
            })
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        buf = None

    out_bytes = out.stat().st_size
    cos = [r["cosine"] for r in records if r["gguf_type"] in BLOCK_TYPES]
    types: Dict[str, int] = {}
    for r in records:
        types[r["gguf_type"]] = types.get(r["gguf_type"], 0) + 1
    return {
        "output": str(out),
        "source": str(root),
        "source_format": src.format,
        "output_format": "gguf",
        "gguf_version": 3,
        "architecture": arch,
        "hf_architecture": llama.arch.hf_arch if llama is not None else None,
        "tokenizer": ({"model": llama.tokenizer.model, "pre": llama.tokenizer.pre,
                       "tokens": llama.tokenizer.n_tokens} if llama is not None else None),
        "notes": list(llama.notes) if llama is not None else [],
        "file_type": main_type,
        "preset": llama.file_type if llama is not None else None,
        "allocation": llama.allocation if llama is not None else None,
        "importance_weighted": [r["name"] for r in records if r["importance_weighted"]],
        "bits_per_weight": 8.0 * sum(r["output_bytes"] for r in records) /
                           max(sum(math.prod(r["shape"]) for r in records), 1),
        "requantized_from": requantized_from,
        "tensors": len(records),
        "types": types,
        "fallbacks": [r["name"] for r in records if r["fallback"]],
        "skipped": skipped,
        "warnings": warnings_out,
        "params": sum(math.prod(r["shape"]) for r in records),
        "input_bytes": total_in,
        "output_bytes": out_bytes,
        "compression_ratio": total_in / out_bytes if out_bytes else 0.0,
        "mean_cosine": float(np.mean(cos)) if cos else None,
        "min_cosine": float(min(cos)) if cos else None,
        "seconds": time.perf_counter() - t0,
        "tensors_detail": records,
    }


def _file_type(target: str, plan: Sequence[Dict[str, Any]], llama: Any) -> Tuple[str, int]:
    """(main type name, general.file_type): a preset's llama.cpp file type;
    otherwise the block type holding the most weights (the target when it
    holds any)."""
    if llama is not None and llama.file_type:
        return llama.file_type, int(_core.gguf_parse_file_type(llama.file_type))
    weights: Dict[str, int] = {}
    for p in plan:
        weights[p["type"]] = weights.get(p["type"], 0) + p["info"].numel
    main = target
    if target not in weights:
        blocks = {t: n for t, n in weights.items() if t in BLOCK_TYPES}
        if blocks:
            main = max(blocks, key=blocks.get)
    return main, int(_core.gguf_file_type(main))


def _read_permuted(src: Any, t: Any, order: np.ndarray, r0: int, n: int,
                   row_bytes: int) -> np.ndarray:
    """Written rows [r0, r0+n) of a row-permuted tensor: reads the span of
    source rows they come from (a head's worth more than n for llama.cpp's
    Q/K layout) and gathers. A 1-D tensor (one row) permutes its elements."""
    if len(t.shape) == 1:
        item = t.nbytes // max(t.numel, 1)
        raw = np.asarray(src.read(t.name, 0, 1)).reshape(t.numel, item)
        return np.ascontiguousarray(raw[order]).reshape(-1)
    idx = np.asarray(order[r0:r0 + n], dtype=np.int64)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    raw = np.asarray(src.read(t.name, lo, hi - lo)).reshape(hi - lo, row_bytes)
    return np.ascontiguousarray(raw[idx - lo]).reshape(-1)


def _version() -> str:
    return __version__


def format_report(report: Dict[str, Any], verbose: bool = False) -> str:
    """Human-readable summary of an export_gguf report (the CLI prints it)."""
    if "layout" in report:
        from .diffusion import format_report as diffusion_report

        return diffusion_report(report, verbose)
    lines = []
    if verbose:
        for r in report["tensors_detail"]:
            shape = "x".join(str(d) for d in r["shape"]) or "scalar"
            cos = "exact" if r["gguf_type"] == "F32" and r["max_abs_error"] == 0 else f"{r['cosine']:.6f}"
            mark = "  (fallback)" if r["fallback"] else ""
            src = r.get("source_name")
            origin = "" if src == r["name"] else f"  <- {src or 'generated'}"
            lines.append(f"  {r['name']:<48} {shape:<14} {r['source_dtype']:<9} {r['gguf_type']:<5} "
                         f"cos {cos}{mark}{origin}")
            lines.append(f"      {r['reason']}" + (f"; {r['transform']}" if r.get("transform")
                                                    else ""))
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items()))
    lines.append(f"wrote {report['output']}: GGUF v{report['gguf_version']}, architecture "
                 f"{report['architecture']}, {report['tensors']} tensors ({types}) in "
                 f"{report['seconds']:.2f} s")
    if report.get("hf_architecture"):
        tok = report["tokenizer"]
        lines.append(f"  llama.cpp architecture {report['architecture']} (from "
                     f"{report['hf_architecture']}), tokenizer {tok['model']} ({tok['tokens']} "
                     f"tokens, pre-tokenizer {tok['pre']})")
    for note in report.get("notes", []):
        lines.append(f"  {note}")
    if report.get("preset"):
        lines.append(f"  llama.cpp preset {report['preset']}: each tensor's type by llama.cpp's "
                     f"rules, {report['bits_per_weight']:.3f} bits per weight")
    if report.get("allocation"):
        a = report["allocation"]
        lines.append(f"  --target-bpw {a['target_bpw']:g}: {a['measured']} tensors measured, "
                     f"planned {a['planned_bpw']:.3f} bits per weight")
    if report.get("importance_weighted"):
        lines.append(f"  {len(report['importance_weighted'])} tensor(s) importance-weighted by "
                     f"--calibration")
    lines.append(f"  {format_size(report['input_bytes'])} -> {format_size(report['output_bytes'])}: "
                 f"compression {report['compression_ratio']:.2f}x")
    if report["mean_cosine"] is not None:
        lines.append(f"  cosine of block-quantized tensors: mean {report['mean_cosine']:.6f}, "
                     f"worst {report['min_cosine']:.6f}")
    if report["fallbacks"]:
        lines.append(f"  {len(report['fallbacks'])} tensor(s) stored wider than "
                     f"{report['file_type']} (0-D/1-D, F32 where llama.cpp needs it, or rows "
                     f"that are no whole number of blocks): {', '.join(report['fallbacks'][:8])}"
                     + (" ..." if len(report["fallbacks"]) > 8 else ""))
    for s in report["skipped"]:
        lines.append(f"  skipped {s['name']}: {s['reason']}")
    if report["requantized_from"]:
        lines.append(f"  note: {report['requantized_from']}")
    for w in report["warnings"][:5]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


#: Bits per code of each type, for the summary's per-tensor records.
_TYPE_BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_K": 5, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4,
              "IQ4_XS": 4, "Q3_K": 3, "Q2_K": 2}


def quantize_to_gguf(job: Any, progress: Any = None) -> Any:
    """Runs a quantize Job whose output format is GGUF: one file, block types
    from the job's bits and scheme (or its gguf_type). Returns the run's
    QuantizeSummary (`details` holds the export report)."""
    from ...run.report import QuantizeSummary, TensorRecord

    cfg = job.config
    # GGUF output writes llama.cpp's block types, whose parameters their
    # layouts fix: the run's param dtype (superblock by default at INT4, an
    # ArrowQuant Parquet V2 format) does not apply.
    report = export_gguf(job.input, job.output, bits=cfg.bit_width, scheme=cfg.scheme,
                         gguf_type=job.gguf_type, threads=cfg.num_threads,
                         overwrite=job.overwrite, progress=progress, arch=job.gguf_arch,
                         layout=job.gguf_layout, max_memory=job.max_memory,
                         keep=cfg.keep_patterns, bits_for=cfg.bits_for,
                         target_bpw=cfg.target_bpw, calibration=job.calibration)

    records = [TensorRecord(
        name=r["name"], shape=tuple(r["shape"]), dtype=r["source_dtype"], quant_type=r["gguf_type"],
        bits=_TYPE_BITS.get(r["gguf_type"]), reason=r["reason"],
        group_size=BLOCK_SIZES.get(r["gguf_type"]), scheme=None, method=None, param_dtype=None,
        chunks=r["chunks"], input_bytes=r["input_bytes"], output_bytes=r["output_bytes"],
        seconds=r["seconds"], cosine=r["cosine"], rel_mse=r["rel_mse"], sqnr_db=r["sqnr_db"],
        max_abs_error=r["max_abs_error"]) for r in report["tensors_detail"]]
    quantized = [r for r in records if r.bits is not None]
    cos = [r.cosine for r in quantized]
    worst = min(quantized, key=lambda r: r.cosine, default=None)
    in_b, out_b, params = report["input_bytes"], report["output_bytes"], report["params"]
    return QuantizeSummary(
        output=report["output"], source=report["source"],
        source_format=report.get("source_format") or report.get("input_kind", "unknown"),
        output_format="gguf", modality=cfg.modality or ("image" if "layout" in report
                                                        else "unknown"),
        bits=cfg.bit_width, tensors=report["tensors"], quantized_tensors=len(quantized),
        params=params, input_bytes=in_b, output_bytes=out_b,
        compression_ratio=in_b / out_b if out_b else 0.0,
        mean_cosine=float(np.mean(cos)) if cos else None, min_cosine=min(cos) if cos else None,
        worst_tensor=worst.name if worst else None,
        bits_per_weight=8.0 * out_b / max(params, 1),
        seconds=report["seconds"], files=[report["output"]], records=records, details=report)
