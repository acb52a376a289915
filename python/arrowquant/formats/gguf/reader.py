"""Reading GGUF files: the validated header (C++ reader), one tensor decoded
by the engine, the block codecs on bytes, and `inspect` of a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from ...engine import core as _core
from ...errors import ModelNotFoundError, ValidationError
from .tables import BLOCK_SIZE, BLOCK_TYPES, GGUF_TYPES, choose_type
from .tables import type_bytes as _type_bytes

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


def quantize_bytes(values: np.ndarray, gguf_type: str) -> np.ndarray:
    """ggml block encoding of float32 values (length a multiple of 32)."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    t = choose_type(gguf_type=gguf_type)
    if t not in BLOCK_TYPES:
        raise ValidationError(f"{t} is not a block type")
    if x.size % BLOCK_SIZE:
        raise ValidationError(f"{x.size} values are not a multiple of {BLOCK_SIZE}")
    out = np.empty(_type_bytes(t, x.size), dtype=np.uint8)
    _core.gguf_quantize_blocks(x, t, out)
    return out


def dequantize_bytes(data: np.ndarray, gguf_type: str, numel: int) -> np.ndarray:
    """Decodes `numel` values of Q8_0 / Q4_0 / Q4_1 / F16 / F32 data to float32."""
    out = np.empty(int(numel), dtype=np.float32)
    _core.gguf_dequantize_blocks(np.ascontiguousarray(data, dtype=np.uint8), gguf_type, out)
    return out


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
