"""The engine, as Python sees it: in-memory quantization of arrays
(quantize_array / dequantize_array) and the chunk quantizer the pipeline
uses. The submodules are the only code that reaches the C++ engine
(arrowquant._core, through engine.core)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..spec import (DEFAULT_SPEC, GRID_METHODS, WIDTH_DEFAULTS, check_spec, groups_per_row, packed_row_bytes,
                    resolve_spec, superblocks_per_row, view_2d)
from . import core
from .core import active_kernel
from .metrics import ErrorSums
from .tensor import QuantizedTensor, as_source


def quantize_array(
    array: Any,
    *,
    bits: int = DEFAULT_SPEC.bits,
    group_size: Optional[int] = None,
    scheme: str = DEFAULT_SPEC.scheme,
    method: Optional[str] = None,
    param_dtype: Optional[str] = None,
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
    if bits in WIDTH_DEFAULTS:  # what is not given follows the bit width (spec.default_spec)
        spec = resolve_spec(bits, group_size, scheme, method, param_dtype)
        group_size, method, param_dtype = spec.group_size, spec.method, spec.param_dtype
    check_spec(bits, group_size, scheme, method, param_dtype)
    src = as_source(array, dtype=dtype, shape=shape, name=name)
    rows, cols = src.rows, src.cols
    if method in GRID_METHODS:
        from .dtypes import to_float32
        from .grid import as_quantized, quantize_grid

        from .finite import check_finite

        x2 = to_float32(src.raw, src.dtype).reshape(rows, cols)
        check_finite(x2, name=name, cols=cols)
        gq = quantize_grid(x2, bits=bits, group_size=group_size, param_dtype=param_dtype,
                           grid=GRID_METHODS[method], name=name, force_scalar=force_scalar)
        return as_quantized(gq, x2, src.shape, src.dtype, method, name)
    G = groups_per_row(cols, group_size)
    packed = np.empty(rows * packed_row_bytes(cols, bits), dtype=np.uint8)
    scales = np.empty(rows * G, dtype=np.float32)
    zero_points = np.empty(rows * G, dtype=np.float32)
    if param_dtype == "superblock":
        units = rows * superblocks_per_row(cols, group_size)
        sb_scales = np.empty(units, dtype=np.float32)
        sb_zeros = np.empty(units, dtype=np.float32)
        a_codes = np.empty(rows * G, dtype=np.uint8)
        c_codes = np.empty(rows * G, dtype=np.uint8)
        sums = core.call(name, core.quantize_superblock, src.raw, src.dtype, rows, cols, bits,
                         group_size, method, packed, scales, zero_points, sb_scales, sb_zeros,
                         threads, force_scalar, 0, a_codes, c_codes)
        return QuantizedTensor(
            data=packed, scales=scales, zero_points=zero_points, shape=src.shape,
            dtype=src.dtype, bits=bits, group_size=group_size, scheme=scheme, method=method,
            param_dtype=param_dtype, name=name, error=ErrorSums(*sums),
            superblock_scales=sb_scales, superblock_zero_points=sb_zeros,
            superblock_codes=(a_codes, c_codes),
        )
    sums = core.call(name, core.quantize, src.raw, src.dtype, rows, cols, bits, group_size,
                     scheme, method, param_dtype, packed, scales, zero_points, threads,
                     force_scalar)
    return QuantizedTensor(
        data=packed, scales=scales, zero_points=zero_points, shape=src.shape, dtype=src.dtype,
        bits=bits, group_size=group_size, scheme=scheme, method=method, param_dtype=param_dtype,
        name=name, error=ErrorSums(*sums),
    )


def dequantize_array(qt: QuantizedTensor, *, threads: int = 0,
                     force_scalar: bool = False) -> np.ndarray:
    """float32 array of qt.shape: x_hat = (q - zero_point) * scale, or on a
    code grid (qt.code_levels) x_hat = (L[q] - zero_point) * scale."""
    if getattr(qt, "code_levels", None) is not None:
        from .grid import dequantize_levels

        return dequantize_levels(qt)
    rows, cols = view_2d(qt.shape)
    out = np.empty(rows * cols, dtype=np.float32)
    core.call(qt.name, core.dequantize, np.ascontiguousarray(qt.data, dtype=np.uint8), rows, cols,
          qt.bits, qt.group_size, np.ascontiguousarray(qt.scales, dtype=np.float32),
          np.ascontiguousarray(qt.zero_points, dtype=np.float32), out, threads, force_scalar)
    return out.reshape(qt.shape)


__all__ = ["quantize_array", "dequantize_array", "active_kernel"]
