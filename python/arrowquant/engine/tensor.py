"""Tensors as the engine sees them: a user's array described without copying
(SourceTensor, as_source) and a quantized tensor in memory (QuantizedTensor)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..errors import ValidationError
from ..spec import (View2D, groups_per_row, param_code_bytes, superblock_code_bits,
                    superblock_groups)
from .dtypes import QUANTIZABLE_DTYPES, canonical_dtype
from .metrics import ErrorMetrics, ErrorSums


@dataclass(frozen=True)
class SourceTensor(View2D):
    """A user's tensor as the engine sees it: a flat byte view (never a copy),
    its dtype name and shape."""

    raw: np.ndarray  # 1-D uint8 view of the original memory
    dtype: str
    shape: Tuple[int, ...]
    name: str


def as_source(array: Any, dtype: Optional[str] = None, shape: Optional[Sequence[int]] = None,
              name: str = "tensor") -> SourceTensor:
    """Validates `array` and describes it without copying.

    `array` may be a numpy array of float32/float16, an ml_dtypes bfloat16 /
    float8 array, raw uint16/uint8 with `dtype` naming the real type, or any
    object with the buffer protocol (then `dtype` is required)."""
    if not isinstance(array, np.ndarray):
        try:
            mv = memoryview(array)
        except TypeError:
            raise ValidationError(
                f"tensor {name!r}: expected a numpy array or a buffer, got {type(array).__name__}"
            ) from None
        if not mv.c_contiguous:
            raise ValidationError(f"tensor {name!r}: buffer is not C-contiguous")
        if dtype is None:
            raise ValidationError(f"tensor {name!r}: a raw buffer needs dtype=...")
        array = np.frombuffer(mv, dtype=np.uint8)
        if shape is None:
            shape = (array.size // QUANTIZABLE_DTYPES[canonical_dtype(dtype)],)
    if not array.flags.c_contiguous:
        raise ValidationError(
            f"tensor {name!r}: array is not C-contiguous (strides {array.strides}); "
            "pass np.ascontiguousarray(a)"
        )
    if dtype is None:
        dtype = array.dtype.name
        if dtype not in QUANTIZABLE_DTYPES:
            raise ValidationError(
                f"tensor {name!r}: dtype {dtype} cannot be quantized; expected float32, float16, "
                "bfloat16, float8_e4m3fn or float8_e5m2 (bfloat16/float8 may be given as raw "
                "uint16/uint8 with dtype=...)"
            )
    dtype = canonical_dtype(dtype)
    shape = tuple(int(d) for d in (array.shape if shape is None else shape))
    if any(d < 0 for d in shape):
        raise ValidationError(f"tensor {name!r}: negative dimension in shape {shape}")
    numel = int(math.prod(shape))
    if numel == 0:
        raise ValidationError(f"tensor {name!r}: tensor is empty (shape {shape})")
    nbytes = array.size * array.itemsize
    if nbytes != numel * QUANTIZABLE_DTYPES[dtype]:
        raise ValidationError(
            f"tensor {name!r}: buffer holds {nbytes} bytes, shape {shape} of {dtype} needs "
            f"{numel * QUANTIZABLE_DTYPES[dtype]}"
        )
    raw = array.reshape(-1).view(np.uint8)  # a view: no copy
    return SourceTensor(raw=raw, dtype=dtype, shape=shape, name=name)


@dataclass
class QuantizedTensor(View2D):
    """A quantized tensor: packed codes (FORMAT.md section 3) and per-group
    parameters (row-major, index r * G + j), with what it was made from."""

    data: np.ndarray          # uint8, rows * packed_row_bytes
    scales: np.ndarray        # float32, rows * G
    zero_points: np.ndarray   # float32, rows * G
    shape: Tuple[int, ...]
    dtype: str                # source dtype
    bits: int
    group_size: int
    scheme: str = "asymmetric"
    method: str = "rtn"
    param_dtype: str = "float32"
    name: str = "tensor"
    error: Optional[ErrorSums] = field(default=None, repr=False)
    # param_dtype "superblock" only: the float16 units of each super-block
    # (float32 arrays holding float16 values, rows * superblocks_per_row);
    # scales / zero_points then hold the exact expanded per-group values.
    superblock_scales: Optional[np.ndarray] = field(default=None, repr=False)
    superblock_zero_points: Optional[np.ndarray] = field(default=None, repr=False)
    # The (scale codes, zero codes) of each group, uint8, when the engine
    # gave them; otherwise param_codes() recovers them from the parameters.
    superblock_codes: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)
    # A code grid (FORMAT.md section 10, method grid-nl / grid-learned): the
    # 2^bits float32 levels codes stand for; None for the uniform grid.
    code_levels: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def quant_type(self) -> str:
        """The V2 quant_type: "grid<bits>" on a code grid, else "int<bits>"."""
        return f"{'int' if self.code_levels is None else 'grid'}{self.bits}"

    @property
    def groups_per_row(self) -> int:
        return groups_per_row(self.cols, self.group_size)

    @property
    def superblock_groups(self) -> int:
        return superblock_groups(self.group_size)

    @property
    def param_code_bits(self) -> int:
        return superblock_code_bits(self.bits)

    def param_codes(self) -> np.ndarray:
        """The packed param_codes stream of a "superblock" tensor."""
        from .superblock import pack_codes, superblock_codes

        if self.superblock_codes is not None:
            return pack_codes(*self.superblock_codes, self.param_code_bits)
        a, c = superblock_codes(self.scales, self.zero_points, self.superblock_scales,
                                self.superblock_zero_points, self.rows, self.groups_per_row,
                                self.superblock_groups)
        return pack_codes(a, c, self.param_code_bits)

    @property
    def metrics(self) -> Optional[ErrorMetrics]:
        return None if self.error is None else self.error.metrics()

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes plus parameters at their storage precision (and
        a code grid's float32 table)."""
        table = 0 if self.code_levels is None else 4 * int(np.asarray(self.code_levels).size)
        return self._param_nbytes() + table

    def _param_nbytes(self) -> int:
        if self.param_dtype == "superblock":
            units = self.superblock_scales.size + self.superblock_zero_points.size
            return int(self.data.nbytes + units * 2
                       + param_code_bytes(self.scales.size, self.param_code_bits))
        param_bytes = 2 if self.param_dtype == "float16" else 4
        return int(self.data.nbytes + (self.scales.size + self.zero_points.size) * param_bytes)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight with the parameters counted."""
        return 8.0 * self.nbytes / self.numel
