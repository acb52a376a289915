"""In-memory quantization with the C++ engine (arrowquant._core)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import _core
from .tensor import (
    ErrorSums,
    QuantizedTensor,
    as_source,
    check_spec,
    groups_per_row,
    packed_row_bytes,
    superblocks_per_row,
    view_2d,
)


def quantize_array(
    array: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    scheme: str = "asymmetric",
    method: str = "rtn",
    param_dtype: str = "float32",
    dtype: Optional[str] = None,
    shape: Optional[Sequence[int]] = None,
    name: str = "tensor",
    threads: int = 0,
    force_scalar: bool = False,
) -> QuantizedTensor:
    """Quantizes one tensor group-wise (FORMAT.md sections 1-3).

    `array` is read in place (C-contiguous, never copied). bfloat16 and float8
    come as ml_dtypes arrays or as raw uint16/uint8 with `dtype=` naming them.
    `threads=0` uses all cores. Raises ValidationError for bad input, naming
    the tensor (and for NaN/Inf the first bad index)."""
    check_spec(bits, group_size, scheme, method, param_dtype)
    src = as_source(array, dtype=dtype, shape=shape, name=name)
    rows, cols = src.rows, src.cols
    G = groups_per_row(cols, group_size)
    packed = np.empty(rows * packed_row_bytes(cols, bits), dtype=np.uint8)
    scales = np.empty(rows * G, dtype=np.float32)
    zero_points = np.empty(rows * G, dtype=np.float32)
    if param_dtype == "superblock":
        units = rows * superblocks_per_row(cols, group_size)
        sb_scales = np.empty(units, dtype=np.float32)
        sb_zeros = np.empty(units, dtype=np.float32)
        sums = _call(name, _core.quantize_superblock, src.raw, src.dtype, rows, cols, bits,
                     group_size, method, packed, scales, zero_points, sb_scales, sb_zeros,
                     threads, force_scalar)
        return QuantizedTensor(
            data=packed, scales=scales, zero_points=zero_points, shape=src.shape,
            dtype=src.dtype, bits=bits, group_size=group_size, scheme=scheme, method=method,
            param_dtype=param_dtype, name=name, error=ErrorSums(*sums),
            superblock_scales=sb_scales, superblock_zero_points=sb_zeros,
        )
    sums = _call(name, _core.quantize, src.raw, src.dtype, rows, cols, bits, group_size, scheme,
                 method, param_dtype, packed, scales, zero_points, threads, force_scalar)
    return QuantizedTensor(
        data=packed, scales=scales, zero_points=zero_points, shape=src.shape, dtype=src.dtype,
        bits=bits, group_size=group_size, scheme=scheme, method=method, param_dtype=param_dtype,
        name=name, error=ErrorSums(*sums),
    )


def dequantize_array(qt: QuantizedTensor, *, threads: int = 0,
                     force_scalar: bool = False) -> np.ndarray:
    """float32 array of qt.shape: x_hat = (q - zero_point) * scale."""
    rows, cols = view_2d(qt.shape)
    out = np.empty(rows * cols, dtype=np.float32)
    _call(qt.name, _core.dequantize, np.ascontiguousarray(qt.data, dtype=np.uint8), rows, cols,
          qt.bits, qt.group_size, np.ascontiguousarray(qt.scales, dtype=np.float32),
          np.ascontiguousarray(qt.zero_points, dtype=np.float32), out, threads, force_scalar)
    return out.reshape(qt.shape)


def _call(name: str, fn, *args):
    """Calls the engine; prefixes its error message with the tensor name."""
    try:
        return fn(*args)
    except Exception as exc:  # re-raised as the same class with context
        from .errors import ArrowQuantError

        if isinstance(exc, ArrowQuantError):
            raise type(exc)(f"tensor {name!r}: {exc}") from None
        raise


def active_kernel() -> str:
    """The SIMD path the engine uses on this CPU ("avx2" or "scalar")."""
    return _core.active_kernel()
