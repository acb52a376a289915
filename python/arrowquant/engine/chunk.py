"""The chunk quantizer: rows of one tensor, already read, into the output
buffers of a V2 chunk, by the engine the run chose (the C++ engine, or the
numpy reference for checks) and the tensor's spec (plain, importance-weighted
or two-level parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import ConfigurationError
from ..spec import QuantSpec
from . import core
from .metrics import ErrorSums


@dataclass
class ChunkBuffers:
    """Output buffers of `rows` rows: packed codes, per-group float32 scales and
    zero points, and with superblock parameters the units of each super-block
    and (when given) each group's scale and zero codes."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    sb_scales: Optional[np.ndarray] = None
    sb_zeros: Optional[np.ndarray] = None
    scale_codes: Optional[np.ndarray] = None   # uint8, one per group (superblock)
    zero_codes: Optional[np.ndarray] = None


class ChunkQuantizer:
    """Quantizes row ranges with the run's engine ("native" or "reference")."""

    def __init__(self, engine: str = "native", threads: int = 0):
        self.engine = engine
        self.threads = threads

    def quantize_rows(self, name: str, raw: np.ndarray, dtype: str, rows: int, cols: int,
                      spec: QuantSpec, out: ChunkBuffers,
                      importance: Optional[np.ndarray] = None,
                      equalization: Optional[np.ndarray] = None,
                      row_offset: int = 0,
                      levels: Optional[np.ndarray] = None) -> ErrorSums:
        """Codes and parameters of `rows` rows of raw `dtype` bytes (rows
        row_offset.. of the tensor, which error messages count from) into `out`."""
        weighted = importance is not None or equalization is not None
        if spec.grid:
            return self._grid(name, raw, dtype, rows, cols, spec, out, importance, equalization,
                              levels, row_offset)
        if spec.superblock:
            if weighted:
                raise ConfigurationError(
                    f"tensor {name!r}: importance-weighted (calibrated) quantization does not "
                    "support param dtype 'superblock'; use float16 or float32 parameters")
            if out.sb_scales is None or out.sb_zeros is None:
                raise ValueError("a superblock spec needs buffers for its units")
            spec.validate()
            if self.engine == "reference":
                qt = self._reference(name, raw, dtype, rows, cols, spec, row_offset)
                out.sb_scales[...] = qt.superblock_scales
                out.sb_zeros[...] = qt.superblock_zero_points
                if out.scale_codes is not None:
                    from .superblock import superblock_codes

                    a, c = superblock_codes(qt.scales, qt.zero_points, qt.superblock_scales,
                                            qt.superblock_zero_points, rows,
                                            qt.groups_per_row, qt.superblock_groups)
                    out.scale_codes[...], out.zero_codes[...] = a, c
                return _copy_out(qt, out)
            sums = core.call(name, core.quantize_superblock, raw, dtype, rows, cols, spec.bits,
                             spec.group_size, spec.method, out.packed, out.scales, out.zeros,
                             out.sb_scales, out.sb_zeros, self.threads, False, row_offset,
                             out.scale_codes, out.zero_codes)
            return ErrorSums(*sums)
        if weighted:
            from .weighted import quantize_weighted

            qt, _info = quantize_weighted(
                raw, dtype=dtype, shape=(rows, cols), bits=spec.bits, group_size=spec.group_size,
                scheme=spec.scheme, importance=importance, equalization=equalization, name=name,
                threads=self.threads, row_offset=row_offset)
            return _copy_out(qt, out)
        if self.engine == "reference":
            return _copy_out(self._reference(name, raw, dtype, rows, cols, spec, row_offset), out)
        sums = core.call(name, core.quantize, raw, dtype, rows, cols, spec.bits, spec.group_size,
                         spec.scheme, spec.method, spec.param_dtype, out.packed, out.scales,
                         out.zeros, self.threads, False, row_offset)
        return ErrorSums(*sums)

    def _grid(self, name: str, raw: np.ndarray, dtype: str, rows: int, cols: int,
              spec: QuantSpec, out: ChunkBuffers, importance: Optional[np.ndarray],
              equalization: Optional[np.ndarray], levels: Optional[np.ndarray],
              row_offset: int) -> ErrorSums:
        """A code grid (FORMAT.md section 10) on the tensor's table `levels`,
        importance-weighted when given."""
        from .dtypes import to_float32
        from .finite import check_finite
        from .grid import pack_rows

        if equalization is not None:
            raise ConfigurationError(f"tensor {name!r}: channel equalization is not supported "
                                     f"with method {spec.method!r}")
        if levels is None:
            raise ValueError("a grid spec needs the tensor's table")
        spec.validate()
        x2 = to_float32(raw, dtype).reshape(rows, cols)
        check_finite(x2, name=name, cols=cols, first_row=row_offset)
        kw = dict(bits=spec.bits, group_size=spec.group_size, param_dtype=spec.param_dtype,
                  grid=spec.grid, importance=importance, levels=levels)
        if self.engine == "reference":
            from ..reference.grid import dequantize, quantize_grid as twin

            gq = twin(x2, **kw)
            xhat = dequantize(gq)
        else:
            from .grid import dequantize_grid, quantize_grid

            gq = quantize_grid(x2, name=name, **kw)
            xhat = dequantize_grid(gq, name)
        out.packed[...] = pack_rows(gq.codes, spec.bits)
        out.scales[...] = gq.scales
        out.zeros[...] = gq.zero_points
        if spec.superblock:
            out.sb_scales[...] = gq.units[0::2]
            out.sb_zeros[...] = gq.units[1::2]
            if out.scale_codes is not None:
                out.scale_codes[...] = gq.a_codes
                out.zero_codes[...] = gq.c_codes
        return ErrorSums.of(x2, xhat)

    @staticmethod
    def _reference(name: str, raw: np.ndarray, dtype: str, rows: int, cols: int,
                   spec: QuantSpec, row_offset: int) -> Any:
        from ..reference import quantize_array

        return quantize_array(raw, dtype=dtype, shape=(rows, cols), bits=spec.bits,
                              group_size=spec.group_size, scheme=spec.scheme, method=spec.method,
                              param_dtype=spec.param_dtype, name=name, row_offset=row_offset)


def _copy_out(qt: Any, out: ChunkBuffers) -> ErrorSums:
    out.packed[...] = qt.data
    out.scales[...] = qt.scales
    out.zeros[...] = qt.zero_points
    return qt.error if qt.error is not None else ErrorSums()
