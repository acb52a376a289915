"""llama.cpp's block types (Q8_0, Q4_0, Q4_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS) as
the C++ engine writes them (cpp/include/arrowquant/gguf_blocks.h).

The bytes are chosen by ArrowQuant's error-minimizing search unless
``mode="reference"`` asks for plain rounding (for Q8_0 / Q4_0 / Q4_1 that is
llama.cpp's reference quantizer, byte for byte ``gguf.quants.quantize``).
An optional per-column importance vector (the role of llama.cpp's imatrix,
e.g. the mean squared input activation of each column) makes the search
minimize ``sum_c w_c (x - x_hat)^2``. Decoding is bit for bit
``gguf.quants.dequantize``. docs/gguf.md describes layouts and search.

Rows must fill whole blocks (32 values, 256 for K-quants and IQ4_XS):
choosing another type for a tensor whose rows do not is the planner's job.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from . import _core
from .errors import ValidationError
from .tensor import ErrorSums

MODES = ("search", "reference")


def block_types() -> Dict[str, dict]:
    """Every type the codecs handle: name -> {id, block_size, block_bytes, quantized}."""
    return {t["name"]: t for t in _core.gguf_block_types()}


def row_bytes(type_name: str, cols: int) -> int:
    """Bytes of one row of ``cols`` values (cols a multiple of the block size)."""
    return int(_core.gguf_row_bytes(str(type_name).upper(), int(cols)))


def bits_per_weight(type_name: str) -> float:
    """Stored bits per value of a type (parameters included): Q4_K 4.5, ..."""
    t = block_types()[str(type_name).upper()]
    return 8.0 * t["block_bytes"] / t["block_size"]


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValidationError(f"expected a 1-D or 2-D array of rows, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_blocks(type_name: str, x: np.ndarray, mode: str = "search",
                    importance: Optional[np.ndarray] = None, threads: int = 0,
                    force_scalar: bool = False) -> Tuple[np.ndarray, ErrorSums]:
    """Encodes rows (float32, rows x cols) as ``type_name``.

    Returns the bytes as a uint8 array of shape (rows, row_bytes) and the
    error sums of the decoded values against ``x`` (unweighted).
    """
    x = _rows(x)
    rows, cols = x.shape
    t = str(type_name).upper()
    out = np.empty((rows, row_bytes(t, cols)), dtype=np.uint8)
    w = None
    if importance is not None:
        w = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    sums = _core.gguf_blocks_quantize(x.reshape(-1), t, rows, cols, out.reshape(-1), mode, w,
                                      int(threads), bool(force_scalar))
    return out, ErrorSums(*sums)


def dequantize_blocks(type_name: str, data: np.ndarray, rows: int, cols: int,
                      threads: int = 0) -> np.ndarray:
    """Decodes ``rows`` x ``cols`` values of ``type_name`` to float32 (rows, cols)."""
    t = str(type_name).upper()
    out = np.empty((int(rows), int(cols)), dtype=np.float32)
    buf = np.ascontiguousarray(np.asarray(data).view(np.uint8)).reshape(-1)
    _core.gguf_blocks_dequantize(buf, t, int(rows), int(cols), out.reshape(-1), int(threads))
    return out


def kernel() -> str:
    """The block kernels used on this CPU ("avx2" or "scalar")."""
    return str(_core.gguf_blocks_kernel())
