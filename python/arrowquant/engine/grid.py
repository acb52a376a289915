"""Code grids (docs/FORMAT.md section 10) in the engine: a table of levels
per tensor (the fixed IQ4_NL-shaped grid "nl", or one learned by weighted
Lloyd iterations), the parameter search on it and the codes, bit for bit the
numpy twin arrowquant.reference.grid. Importance weights (per column, e.g.
calibration statistics) weight the search and the learned table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import ValidationError
from . import core
from .dtypes import to_float32

#: llama.cpp's IQ4_NL values (kvalues_iq4nl), mapped onto [0, 15] as
#: (v + 127) / 16: FORMAT.md 10.1's fixed grid "nl" (exact float32 values;
#: kNlLevels in cpp/include/arrowquant/grid.h).
NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NL_LEVELS = (np.array(NL_VALUES, dtype=np.float32) + np.float32(127)) / np.float32(16)

GRIDS = ("nl", "learned")


@dataclass
class GridQuant:
    """A grid-quantized 2-D tensor: codes (rows, cols) uint8 (one per weight),
    per-group scales / zero points (rows * G, float32 values as stored), the
    table of 2^bits levels."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    levels: np.ndarray
    bits: int
    group_size: int
    param_dtype: str
    #: param_dtype "superblock": (d, dz) per super-block, flattened, and the
    #: per-group codes a, c (FORMAT.md 10.5); None otherwise.
    units: Optional[np.ndarray] = None
    a_codes: Optional[np.ndarray] = None
    c_codes: Optional[np.ndarray] = None

    def nbytes(self) -> int:
        """Stored bytes: packed codes, parameters (float16 / float32 per group,
        or float16 units plus 2 * p bits per group), the float32 table once."""
        code_bytes = (self.codes.size * self.bits + 7) // 8
        if self.param_dtype == "superblock":
            p = 4 if self.bits == 2 else 6
            params = 2 * self.units.size + (self.scales.size * 2 * p + 7) // 8
        else:
            params = (2 if self.param_dtype == "float16" else 4) * 2 * self.scales.size
        return code_bytes + params + 4 * self.levels.size

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / max(1, self.codes.size)


def levels_for(x2: np.ndarray, bits: int, group_size: int, grid: str,
               importance: Optional[np.ndarray] = None, name: str = "tensor",
               force_scalar: bool = False) -> np.ndarray:
    """The table of a tensor: the fixed "nl" one, or the learned one."""
    if grid == "nl":
        if bits != 4:
            raise ValidationError(f"{name}: grid 'nl' is a 4-bit table, got bits={bits}")
        return NL_LEVELS.copy()
    if grid != "learned":
        raise ValidationError(f"{name}: grid must be one of {GRIDS}, got {grid!r}")
    start = NL_LEVELS if bits == 4 else np.arange(1 << bits, dtype=np.float32)
    out = np.empty(1 << bits, np.float32)
    core.call(name, core.grid_learn_levels, x2.reshape(-1), x2.shape[0], x2.shape[1],
              int(group_size), int(bits), importance, np.ascontiguousarray(start, np.float32), out,
              bool(force_scalar))
    return out


def quantize_grid(array: Any, *, bits: int = 4, group_size: int = 64,
                  param_dtype: str = "float16", grid: str = "nl",
                  importance: Optional[np.ndarray] = None, name: str = "tensor",
                  force_scalar: bool = False,
                  levels: Optional[np.ndarray] = None) -> GridQuant:
    """Quantizes a tensor (viewed as rows x cols, FORMAT.md section 1) on a
    code grid; codes are one byte per weight (pack them with FORMAT.md
    section 3's packer). `force_scalar` skips the AVX2 error pass (same bits).
    `levels`: the tensor's table when already chosen (the pipeline learns it
    once per tensor and quantizes the tensor's chunks on it)."""
    if param_dtype not in ("float32", "float16", "superblock"):
        raise ValidationError(f"{name}: a grid takes float32, float16 or superblock "
                              f"parameters, not {param_dtype!r}")
    a = np.asarray(array)
    if a.dtype != np.float32:
        a = to_float32(np.ascontiguousarray(a).reshape(-1), a.dtype.name).reshape(a.shape)
    rows = a.shape[0] if a.ndim >= 2 else 1
    x2 = np.ascontiguousarray(a, dtype=np.float32).reshape(rows, -1)
    cols = x2.shape[1]
    w = None
    if importance is not None:
        w = np.ascontiguousarray(importance, np.float32).reshape(-1)
    if levels is None:
        levels = levels_for(x2, bits, group_size, grid, w, name, force_scalar)
    levels = np.ascontiguousarray(levels, np.float32)
    G = -(-cols // group_size)
    codes = np.empty((rows, cols), np.uint8)
    scales = np.empty(rows * G, np.float32)
    zeros = np.empty(rows * G, np.float32)
    if param_dtype == "superblock":
        K = max(1, 256 // int(group_size))
        units = np.empty(rows * 2 * (-(-G // K)), np.float32)
        a = np.empty(rows * G, np.uint8)
        c = np.empty(rows * G, np.uint8)
        core.call(name, core.grid_quantize_superblock, x2.reshape(-1), rows, cols, int(group_size),
                  int(bits), levels, w, codes.reshape(-1), scales, zeros, units, a, c,
                  bool(force_scalar))
        return GridQuant(codes=codes, scales=scales, zero_points=zeros, levels=levels, bits=bits,
                         group_size=group_size, param_dtype=param_dtype, units=units, a_codes=a,
                         c_codes=c)
    core.call(name, core.grid_quantize, x2.reshape(-1), rows, cols, int(group_size), int(bits),
              param_dtype == "float16", levels, w, codes.reshape(-1), scales, zeros,
              bool(force_scalar))
    return GridQuant(codes=codes, scales=scales, zero_points=zeros, levels=levels, bits=bits,
                     group_size=group_size, param_dtype=param_dtype)


def dequantize_grid(gq: GridQuant, name: str = "tensor") -> np.ndarray:
    rows, cols = gq.codes.shape
    out = np.empty((rows, cols), np.float32)
    core.call(name, core.grid_dequantize, np.ascontiguousarray(gq.codes).reshape(-1), rows, cols,
              int(gq.group_size), int(gq.bits), np.ascontiguousarray(gq.levels, np.float32),
              gq.scales, gq.zero_points, out.reshape(-1))
    return out


# --- grids in V2 tensors (FORMAT.md 10.3): packed codes and the table ----------------------


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) one-byte codes packed per row as FORMAT.md section 3."""
    rows, cols = codes.shape
    per = 8 // bits
    if per == 1:
        return np.ascontiguousarray(codes, np.uint8).reshape(-1)
    row_bytes = (cols * bits + 7) // 8
    padded = np.zeros((rows, row_bytes * per), np.uint8)
    padded[:, :cols] = codes
    padded = padded.reshape(rows, row_bytes, per)
    out = np.zeros((rows, row_bytes), np.uint8)
    for k in range(per):
        out |= padded[:, :, k] << np.uint8(k * bits)
    return out.reshape(-1)


def unpack_rows(packed: np.ndarray, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of pack_rows: (rows, cols) uint8 codes."""
    per = 8 // bits
    row_bytes = (cols * bits + 7) // 8
    p = np.asarray(packed, np.uint8).reshape(rows, row_bytes)
    if per == 1:
        return np.ascontiguousarray(p)
    mask = np.uint8((1 << bits) - 1)
    parts = [(p >> np.uint8(k * bits)) & mask for k in range(per)]
    return np.ascontiguousarray(np.stack(parts, axis=2).reshape(rows, row_bytes * per)[:, :cols])


def as_quantized(gq: GridQuant, x2: np.ndarray, shape: Any, dtype: str, method: str,
                 name: str) -> Any:
    """A QuantizedTensor of a GridQuant (packed codes, per-group parameters,
    the superblock units and codes, the table in `code_levels`)."""
    return as_quantized_twin(gq, x2, dequantize_grid(gq, name), shape, dtype, method, name)


def as_quantized_twin(gq: GridQuant, x2: np.ndarray, xhat: np.ndarray, shape: Any, dtype: str,
                      method: str, name: str) -> Any:
    """as_quantized with x_hat given (the numpy twin decodes with its own code)."""
    from .metrics import ErrorSums
    from .tensor import QuantizedTensor

    extra = {}
    if gq.param_dtype == "superblock":
        extra = dict(superblock_scales=np.ascontiguousarray(gq.units[0::2]),
                     superblock_zero_points=np.ascontiguousarray(gq.units[1::2]),
                     superblock_codes=(gq.a_codes, gq.c_codes))
    return QuantizedTensor(
        data=pack_rows(gq.codes, gq.bits), scales=gq.scales, zero_points=gq.zero_points,
        shape=tuple(shape), dtype=dtype, bits=gq.bits, group_size=gq.group_size,
        scheme="asymmetric", method=method, param_dtype=gq.param_dtype, name=name,
        error=ErrorSums.of(x2, xhat), code_levels=gq.levels, **extra)


def dequantize_levels(qt: Any) -> np.ndarray:
    """x_hat of a QuantizedTensor on a code grid (FORMAT.md 10.2), float32, qt.shape."""
    rows, cols = qt.rows, qt.cols
    codes = unpack_rows(qt.data, rows, cols, qt.bits)
    out = np.empty((rows, cols), np.float32)
    core.call(qt.name, core.grid_dequantize, codes.reshape(-1), rows, cols, int(qt.group_size),
              int(qt.bits), np.ascontiguousarray(qt.code_levels, np.float32),
              np.ascontiguousarray(qt.scales, np.float32),
              np.ascontiguousarray(qt.zero_points, np.float32), out.reshape(-1))
    return out.reshape(qt.shape)
