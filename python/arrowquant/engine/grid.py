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
                  force_scalar: bool = False) -> GridQuant:
    """Quantizes a tensor (viewed as rows x cols, FORMAT.md section 1) on a
    code grid; codes are one byte per weight (pack them with FORMAT.md
    section 3's packer). `force_scalar` skips the AVX2 error pass (same bits)."""
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
    levels = levels_for(x2, bits, group_size, grid, w, name, force_scalar)
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
