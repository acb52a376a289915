"""The quantization math of FORMAT.md in plain numpy.

This is the oracle of the tests and the baseline of the benchmarks: vectorized
per tensor (no Python loop per element or group), float32 arithmetic in the
same order as the engine, so that both agree bit for bit. It mirrors the
engine's API (quantize_array / dequantize_array) so either can drive the same
pipeline."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..engine.dtypes import to_float32
from ..engine.finite import check_finite
from ..engine.metrics import ErrorSums
from ..engine.tensor import QuantizedTensor, as_source
from ..errors import ValidationError
from ..spec import (DEFAULT_SPEC, GRID_METHODS, WIDTH_DEFAULTS, check_spec, groups_per_row,
                    packed_row_bytes,
                    resolve_spec, view_2d)

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def _check_finite(x: np.ndarray, cols: int, name: str, first_row: int = 0) -> None:
    check_finite(x, name=name, cols=cols, first_row=first_row)


def _group_reduce(x2: np.ndarray, g: int, fn) -> np.ndarray:
    """fn (np.min / np.max) over each group of each row: shape (R, G)."""
    rows, cols = x2.shape
    full = cols // g
    parts = []
    if full:
        parts.append(fn(x2[:, : full * g].reshape(rows, full, g), axis=2))
    if cols % g:
        parts.append(fn(x2[:, full * g :], axis=1)[:, None])
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _expand(per_group: np.ndarray, g: int, cols: int) -> np.ndarray:
    """(R, G) -> (R, cols): each group's value repeated over its elements."""
    return np.repeat(per_group, g, axis=1)[:, :cols]


def rtn_params(x2: np.ndarray, bits: int, group_size: int, scheme: str,
               name: str = "tensor") -> Tuple[np.ndarray, np.ndarray]:
    """FORMAT.md rtn scale and zero point per group, each (R, G) float32."""
    with np.errstate(all="ignore"):
        if scheme == "symmetric":
            a = _group_reduce(np.abs(x2), group_size, np.max)
            m = np.float32(2 ** (bits - 1) - 1)
            s = np.where(a > _F0, a / m, _F1).astype(np.float32)
            bad = (s == _F0) | ~np.isfinite(_F1 / s)
            scale = np.where(bad, _F1, s).astype(np.float32)
            zero = np.full_like(scale, np.float32(2 ** (bits - 1)))
            return scale, zero
        q_max = np.float32(2**bits - 1)
        lo = _group_reduce(x2, group_size, np.min) + _F0  # -0 -> +0, as the engine
        hi = _group_reduce(x2, group_size, np.max) + _F0
        s = (hi - lo) / q_max
        spread = hi > lo
        overflow = spread & ~np.isfinite(s)
        if overflow.any():
            r, j = (int(v[0]) for v in np.nonzero(overflow))
            raise ValidationError(
                f"tensor {name!r}: row {r}, group {j}: group range max - min overflows float32 "
                f"(min {lo[r, j]}, max {hi[r, j]})"
            )
        ok = spread & (s != _F0) & np.isfinite(_F1 / s)
        safe_s = np.where(ok, s, _F1).astype(np.float32)
        scale = safe_s
        zero = np.where(ok, -lo / safe_s, -lo).astype(np.float32)
        return scale, zero


def encode(x2: np.ndarray, bits: int, group_size: int, scheme: str, scale: np.ndarray,
           zero: np.ndarray) -> np.ndarray:
    """Codes (R, C) uint8 for given (R, G) parameters."""
    rows, cols = x2.shape
    q_max = np.float32(2**bits - 1)
    inv = _expand(_F1 / scale, group_size, cols)
    z = _expand(zero, group_size, cols)
    with np.errstate(all="ignore"):
        if scheme == "symmetric":
            v = np.rint(x2 * inv) + z
        else:
            v = np.rint(x2 * inv + z)
    return np.clip(v, _F0, q_max).astype(np.uint8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs (R, C) codes per row, little-endian within each byte."""
    rows, cols = codes.shape
    per_byte = 8 // bits
    row_bytes = packed_row_bytes(cols, bits)
    if per_byte == 1:
        return np.ascontiguousarray(codes).reshape(-1)
    padded = np.zeros((rows, row_bytes * per_byte), dtype=np.uint8)
    padded[:, :cols] = codes
    padded = padded.reshape(rows, row_bytes, per_byte)
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    for k in range(per_byte):  # 2 or 4 passes over the tensor, not per element
        out |= padded[:, :, k] << np.uint8(k * bits)
    return out.reshape(-1)


def unpack(packed: np.ndarray, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of pack: (R, C) uint8 codes."""
    per_byte = 8 // bits
    row_bytes = packed_row_bytes(cols, bits)
    p = np.asarray(packed, dtype=np.uint8).reshape(rows, row_bytes)
    if per_byte == 1:
        return p
    mask = np.uint8(2**bits - 1)
    parts = [(p >> np.uint8(k * bits)) & mask for k in range(per_byte)]
    return np.stack(parts, axis=2).reshape(rows, row_bytes * per_byte)[:, :cols]


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                     group_size: int) -> np.ndarray:
    cols = codes.shape[1]
    return (codes.astype(np.float32) - _expand(zero, group_size, cols)) * _expand(
        scale, group_size, cols
    )


def choose_params(x2: np.ndarray, bits: int, group_size: int, scheme: str, method: str,
                  param_dtype: str, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per group for a method (FORMAT.md rtn; mse and
    float16 parameters in reference.search)."""
    scale, zero = rtn_params(x2, bits, group_size, scheme, name)
    if method == "rtn" and param_dtype == "float32":
        return scale, zero
    from .search import search_params

    return search_params(x2, bits, group_size, scheme, method, param_dtype, scale, zero, name)


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
    row_offset: int = 0,
) -> QuantizedTensor:
    """Same contract as arrowquant.engine.quantize_array (threads ignored)."""
    del threads, force_scalar
    if bits in WIDTH_DEFAULTS:  # what is not given follows the bit width (spec.default_spec)
        spec = resolve_spec(bits, group_size, scheme, method, param_dtype)
        group_size, method, param_dtype = spec.group_size, spec.method, spec.param_dtype
    check_spec(bits, group_size, scheme, method, param_dtype)
    src = as_source(array, dtype=dtype, shape=shape, name=name)
    rows, cols = src.rows, src.cols
    x = to_float32(src.raw, src.dtype)
    _check_finite(x, cols, name, row_offset)
    x2 = x.reshape(rows, cols)
    if method in GRID_METHODS:
        _check_finite(x, cols, name, row_offset)
        from ..engine.grid import as_quantized_twin
        from .grid import dequantize as grid_dequantize, quantize_grid

        gq = quantize_grid(x2, bits=bits, group_size=group_size, param_dtype=param_dtype,
                           grid=GRID_METHODS[method])
        return as_quantized_twin(gq, x2, grid_dequantize(gq), src.shape, src.dtype, method, name)
    sb_scales = sb_zeros = None
    if param_dtype == "superblock":
        from .superblock import superblock_params

        s_rtn, z_rtn = rtn_params(x2, bits, group_size, scheme, name)
        scale, zero, sb_scales, sb_zeros = superblock_params(x2, bits, group_size, method, s_rtn,
                                                             z_rtn, name)
        sb_scales, sb_zeros = sb_scales.reshape(-1), sb_zeros.reshape(-1)
    else:
        scale, zero = choose_params(x2, bits, group_size, scheme, method, param_dtype, name)
    codes = encode(x2, bits, group_size, scheme, scale, zero)
    xhat = dequantize_codes(codes, scale, zero, group_size)
    return QuantizedTensor(
        data=pack(codes, bits), scales=scale.reshape(-1), zero_points=zero.reshape(-1),
        shape=src.shape, dtype=src.dtype, bits=bits, group_size=group_size, scheme=scheme,
        method=method, param_dtype=param_dtype, name=name, error=ErrorSums.of(x2, xhat),
        superblock_scales=sb_scales, superblock_zero_points=sb_zeros,
    )


def dequantize_array(qt: QuantizedTensor, *, threads: int = 0,
                     force_scalar: bool = False) -> np.ndarray:
    """float32 array of qt.shape."""
    del threads, force_scalar
    rows, cols = view_2d(qt.shape)
    G = groups_per_row(cols, qt.group_size)
    codes = unpack(qt.data, rows, cols, qt.bits)
    scale = np.asarray(qt.scales, dtype=np.float32).reshape(rows, G)
    zero = np.asarray(qt.zero_points, dtype=np.float32).reshape(rows, G)
    if getattr(qt, "code_levels", None) is not None:
        from .grid import decode

        col_group = np.arange(cols) // qt.group_size
        return decode(codes, scale[:, col_group], zero[:, col_group],
                      np.asarray(qt.code_levels, np.float32)).reshape(qt.shape)
    return dequantize_codes(codes, scale, zero, qt.group_size).reshape(qt.shape)
