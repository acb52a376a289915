"""GGUF export: a source model (SafeTensors, Parquet V1, or an ArrowQuant
Parquet V2 directory) written as a GGUF v3 file by the C++ streaming writer
(cpp/src/gguf.cc), tensor by tensor in row chunks, in bounded memory.

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

The tensor names are the source's (HF / diffusers names); no tokenizer is
written. The file is a valid GGUF v3 container that gguf-py and other GGUF
readers open; running it in llama.cpp would also need llama.cpp's tensor
names and tokenizer metadata.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .errors import ArrowQuantError, ConfigurationError, ValidationError
from .tensor import ErrorSums

PathLike = Union[str, "os.PathLike[str]"]

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
              "IQ4_XS", "F16", "F32")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
               "IQ4_XS")
BLOCK_SIZE = 32
#: Values per block of each block type (K-quants and IQ4_XS: super-blocks of 256).
BLOCK_SIZES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "IQ4_NL": 32, "Q2_K": 256, "Q3_K": 256,
               "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 63  # ggml keeps tensor names in char[64]
#: Bytes per block (BLOCK_SIZES values; or per element for F16/F32).
TYPE_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "IQ4_NL": 18, "Q2_K": 84, "Q3_K": 110,
              "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "IQ4_XS": 136, "F16": 2, "F32": 4}
#: Worst-case absolute error of one value, as a fraction of its block's
#: max |x| (Q8_0, Q4_0) or range (Q4_1); the f16 rounding of the block
#: parameters adds up to 2^-11 relative on top.
ERROR_BOUND = {"Q8_0": 0.5 / 127, "Q4_0": 1.0 / 8, "Q4_1": 0.5 / 15}
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


def choose_type(bits: int = 4, scheme: str = "symmetric", gguf_type: Optional[str] = None) -> str:
    """The GGUF type for weight matrices from bits / scheme / an override."""
    if gguf_type is not None:
        t = str(gguf_type).upper()
        if t not in GGUF_TYPES:
            raise ConfigurationError(
                f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
        return t
    if scheme not in ("symmetric", "asymmetric"):
        raise ConfigurationError(f"scheme must be 'symmetric' or 'asymmetric', got {scheme!r}")
    if bits == 8:
        return "Q8_0"
    if bits == 4:
        return "Q4_0" if scheme == "symmetric" else "Q4_1"
    raise ConfigurationError(
        f"GGUF export has no {bits}-bit type; use bits 4 or 8, or gguf_type="
        f"{'/'.join(GGUF_TYPES)}")


def tensor_type(shape: Sequence[int], dtype: str, target: str) -> Tuple[Optional[str], str, bool]:
    """(type or None to skip, reason, fell_back) for one tensor (see the module doc)."""
    from .tensor import QUANTIZABLE_DTYPES

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
            try:
                cfg = json.loads(candidate.read_text())
            except ValueError:
                cfg = {}
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
    from .api import _progress_fn

    return _progress_fn(progress, total)


def export_gguf(source: Any, out_path: PathLike, *, bits: int = 4, scheme: str = "symmetric",
                gguf_type: Optional[str] = None, threads: int = 0, progress: Any = None,
                overwrite: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                name: Optional[str] = None) -> Dict[str, Any]:
    """Writes the model at `source` (path, or an open ModelSource) to a GGUF v3
    file at `out_path`, streaming tensor by tensor in row chunks of at most
    `chunk_bytes` source bytes (one row at least). Returns the report dict.

    The file appears only when complete (written under a temporary name and
    renamed); on any error the temporary file is removed. `progress` is a
    `(message, fraction)` callable (its exceptions become warnings), True for a
    progress bar, or None/False."""
    from .sources import ModelSource, open_model

    target = choose_type(bits, scheme, gguf_type)
    out = Path(out_path)
    if out.is_dir():
        raise ArrowQuantError(f"{out}: is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        raise ArrowQuantError(f"{out.parent}: output directory does not exist")
    if chunk_bytes <= 0:
        raise ConfigurationError(f"chunk_bytes must be positive, got {chunk_bytes}")

    t0 = time.perf_counter()
    own = not isinstance(source, ModelSource)
    src = open_model(source) if own else source
    try:
        return _export(src, out, target, bits, scheme, gguf_type, threads, progress, chunk_bytes,
                       name, t0)
    finally:
        if own:
            src.close()


def _export(src: Any, out: Path, target: str, bits: int, scheme: str, gguf_type: Optional[str],
            threads: int, progress: Any, chunk_bytes: int, name: Optional[str],
            t0: float) -> Dict[str, Any]:
    root = Path(src.root)
    metadata, arch = _config_metadata(root if root.is_dir() else root.parent, name)
    requantized_from = None
    if src.format == "arrowquant-parquet-v2":
        q = src.metadata.get("quantization", {})
        requantized_from = (f"arrowquant-parquet-v2 (int{q.get('bits', '?')}, group size "
                            f"{q.get('group_size', '?')}): dequantized to float32, then "
                            f"requantized to {target}")

    plan: List[Dict[str, Any]] = []
    specs: List[Tuple[str, List[int], str]] = []
    skipped: List[Dict[str, str]] = []
    warnings_out: List[str] = []
    for t in src.tensors:
        ttype, reason, fell_back = tensor_type(t.shape, t.dtype, target)
        if ttype is None:
            skipped.append({"name": t.name, "reason": reason})
            continue
        if t.numel == 0:
            skipped.append({"name": t.name, "reason": "skipped: empty tensor"})
            continue
        shape, shape_note = gguf_shape(t.shape)
        if shape_note:
            reason = f"{reason}; {shape_note}"
        if len(t.name.encode()) > MAX_NAME_BYTES:
            warnings_out.append(f"tensor {t.name!r}: name longer than {MAX_NAME_BYTES} bytes; "
                                "valid GGUF, but ggml-based loaders (llama.cpp) refuse it")
        specs.append((t.name, list(shape), ttype))
        plan.append({"info": t, "type": ttype, "reason": reason, "fallback": fell_back,
                     "shape": shape})

    main_type = target
    metadata += [
        ("general.alignment", "uint32", ALIGNMENT),
        ("general.quantization_version", "uint32", 2),
        ("general.file_type", "uint32", int(_core.gguf_file_type(main_type))),
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
            for r0 in range(0, rows, rows_per_chunk):
                n = min(rows_per_chunk, rows - r0)
                raw = src.read(t.name, r0, n, out=buf[: n * row_bytes])
                part = writer.append_rows(np.ascontiguousarray(raw), t.dtype, n * per_row,
                                          w_cols, threads)
                sums.merge(ErrorSums(*part))
                chunks += 1
                done_bytes += n * row_bytes
                if report_progress is not None:
                    report_progress(t.name, done_bytes / max(total_in, 1))
            m = sums.metrics()
            nbytes = _type_bytes(p["type"], t.numel)
            records.append({
                "name": t.name, "shape": list(t.shape), "gguf_dims": list(reversed(p["shape"])),
                "source_dtype": t.dtype, "gguf_type": p["type"], "reason": p["reason"],
                "fallback": p["fallback"], "input_bytes": t.nbytes, "output_bytes": nbytes,
                "chunks": chunks, "cosine": m.cosine, "rel_mse": m.rel_mse,
                "sqnr_db": m.sqnr_db if math.isfinite(m.sqnr_db) else None,
                "max_abs_error": m.max_abs_error,
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
        "file_type": main_type,
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


def _type_bytes(gtype: str, numel: int) -> int:
    if gtype in BLOCK_TYPES:
        return numel // BLOCK_SIZES[gtype] * TYPE_BYTES[gtype]
    return numel * TYPE_BYTES[gtype]


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- reading


def read_header(path: PathLike) -> Dict[str, Any]:
    """The validated header of a GGUF file (C++ reader): version, alignment,
    data_offset, metadata [(key, type, value)], tensors [{name, dims, type,
    offset, nbytes, numel}]. Raises FormatError for a malformed file."""
    return _core.gguf_read_file(str(path))


def dequantize_tensor(path: PathLike, name: str) -> np.ndarray:
    """One tensor of a GGUF file decoded by the engine (float32, numpy shape).
    Reads only that tensor's bytes."""
    header = read_header(path)
    for t in header["tensors"]:
        if t["name"] == name:
            break
    else:
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"{path}: no tensor named {name!r}")
    if t["type"] not in GGUF_TYPES:
        raise ValidationError(f"{path}: tensor {name!r} has type {t['type']}; the engine decodes "
                              f"{', '.join(GGUF_TYPES)}")
    with open(path, "rb") as f:
        f.seek(header["data_offset"] + t["offset"])
        data = np.frombuffer(f.read(t["nbytes"]), dtype=np.uint8)
    return dequantize_bytes(data, t["type"], t["numel"]).reshape(tuple(reversed(t["dims"])))


def quantize_bytes(values: np.ndarray, gguf_type: str, mode: str = "search",
                   importance: Optional[np.ndarray] = None) -> np.ndarray:
    """ggml block encoding of float32 values (one row; length a multiple of
    the type's block size). mode "reference": plain rounding (llama.cpp's
    reference bytes for Q8_0 / Q4_0 / Q4_1); see gguf_blocks."""
    from .gguf_blocks import quantize_blocks

    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    t = choose_type(gguf_type=gguf_type)
    if t not in BLOCK_TYPES:
        raise ValidationError(f"{t} is not a block type")
    if x.size % BLOCK_SIZES[t]:
        raise ValidationError(f"{x.size} values are not a multiple of {BLOCK_SIZES[t]}")
    cols = x.size if importance is not None else BLOCK_SIZES[t]
    out, _ = quantize_blocks(t, x.reshape(-1, cols), mode=mode, importance=importance)
    return out.reshape(-1)


def dequantize_bytes(data: np.ndarray, gguf_type: str, numel: int) -> np.ndarray:
    """Decodes `numel` values of any block type, F16 or F32 to float32."""
    from .gguf_blocks import dequantize_blocks

    t = str(gguf_type).upper()
    cols = BLOCK_SIZES.get(t, 1)
    return dequantize_blocks(t, data, int(numel) // cols, cols).reshape(-1)


def inspect_gguf(path: PathLike) -> Dict[str, Any]:
    """`arrowquant inspect` for a .gguf file: metadata and, per tensor, numpy
    shape, GGUF dims, type, bytes and bits per weight."""
    header = read_header(path)
    metadata: Dict[str, Any] = {}
    for key, vtype, value in header["metadata"]:
        if isinstance(value, list) and len(value) > 16:
            value = value[:16] + [f"... ({len(value)} items)"]
        metadata[key] = value
    tensors = []
    for t in header["tensors"]:
        tensors.append({
            "name": t["name"], "shape": list(reversed(t["dims"])), "gguf_dims": list(t["dims"]),
            "dtype": t["type"], "quant_type": t["type"], "bytes": t["nbytes"],
            "bits_per_weight": 8.0 * t["nbytes"] / t["numel"] if t["numel"] else None,
        })
    params = sum(t["numel"] for t in header["tensors"])
    nbytes = sum(t["nbytes"] for t in header["tensors"])
    return {
        "path": str(path), "format": "gguf", "gguf_version": header["version"],
        "alignment": header["alignment"], "modality": None,
        "architecture": metadata.get("general.architecture"), "metadata": metadata,
        "tensors": tensors, "num_tensors": len(tensors), "params": params, "bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / params if params else 0.0,
        "files": [Path(path).name],
    }


def format_report(report: Dict[str, Any], verbose: bool = False) -> str:
    """Human-readable summary of an export_gguf report (the CLI prints it)."""
    from .units import format_size

    lines = []
    if verbose:
        for r in report["tensors_detail"]:
            shape = "x".join(str(d) for d in r["shape"]) or "scalar"
            cos = "exact" if r["gguf_type"] == "F32" and r["max_abs_error"] == 0 else f"{r['cosine']:.6f}"
            mark = "  (fallback)" if r["fallback"] else ""
            lines.append(f"  {r['name']:<48} {shape:<14} {r['source_dtype']:<9} {r['gguf_type']:<5} "
                         f"cos {cos}{mark}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items()))
    lines.append(f"wrote {report['output']}: GGUF v{report['gguf_version']}, architecture "
                 f"{report['architecture']}, {report['tensors']} tensors ({types}) in "
                 f"{report['seconds']:.2f} s")
    lines.append(f"  {format_size(report['input_bytes'])} -> {format_size(report['output_bytes'])}: "
                 f"compression {report['compression_ratio']:.2f}x")
    if report["mean_cosine"] is not None:
        lines.append(f"  cosine of block-quantized tensors: mean {report['mean_cosine']:.6f}, "
                     f"worst {report['min_cosine']:.6f}")
    if report["fallbacks"]:
        lines.append(f"  {len(report['fallbacks'])} tensor(s) stored wider (row length not a "
                     f"multiple of 32, or 0-D/1-D): {', '.join(report['fallbacks'][:8])}"
                     + (" ..." if len(report["fallbacks"]) > 8 else ""))
    for s in report["skipped"]:
        lines.append(f"  skipped {s['name']}: {s['reason']}")
    if report["requantized_from"]:
        lines.append(f"  note: {report['requantized_from']}")
    for w in report["warnings"][:5]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
