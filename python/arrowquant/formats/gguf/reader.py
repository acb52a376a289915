"""Reading GGUF files: the validated header (C++ reader), one tensor decoded
by the engine, the block codecs on bytes, and `inspect` of a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ...engine import core as _core  # noqa: F401
from ...errors import ModelNotFoundError, ValidationError
from ...engine.gguf_blocks import dequantize_blocks, quantize_blocks
from .tables import BLOCK_SIZES, BLOCK_TYPES, GGUF_TYPES, choose_type

PathLike = Any


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
    reference bytes for Q8_0 / Q4_0 / Q4_1); see engine.gguf_blocks."""
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
    by_type: Dict[str, Dict[str, Any]] = {}
    for t in header["tensors"]:
        d = by_type.setdefault(t["type"], {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += t["numel"]
        d["bytes"] += t["nbytes"]
    for d in by_type.values():
        d["bits_per_weight"] = 8.0 * d["bytes"] / d["params"] if d["params"] else None
    return {
        "types": by_type,
        "path": str(path), "format": "gguf", "gguf_version": header["version"],
        "alignment": header["alignment"], "modality": None,
        "architecture": metadata.get("general.architecture"), "metadata": metadata,
        "tensors": tensors, "num_tensors": len(tensors), "params": params, "bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / params if params else 0.0,
        "files": [Path(path).name],
    }
