"""QuantSpec: how one tensor is quantized (bits, group size, scheme, method,
parameter storage), and the geometry that follows from it.

This module is the only place the defaults live; it mirrors the C++
`arrowquant::QuantSpec` (cpp/include/arrowquant/quantize.h). The CLI, the
configuration, the planners, the pipeline and the array API all start from
`QuantSpec()` and change only what the user asked for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence, Tuple

import numpy as np

from .errors import ValidationError

VALID_BITS = (2, 4, 8)
VALID_SCHEMES = ("asymmetric", "symmetric")
VALID_METHODS = ("rtn", "mse")
VALID_PARAM_DTYPES = ("float32", "float16", "superblock")

#: Two-level parameters (param_dtype "superblock", docs/FORMAT.md section 9):
#: the groups of a row are taken SUPERBLOCK_WEIGHTS // group_size at a time
#: (at least one); each super-block stores a float16 scale unit `d` and zero
#: point unit `dz`, each group a scale code `a` in [1, 2^p - 1] and a zero code
#: `c` in [0, 2^p - 1]; the group's parameters are `a * d` and `c * dz`
#: (float32 products, exact).
SUPERBLOCK_WEIGHTS = 256


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized. The defaults are the measured best trade-off
    per byte and per second (docs/quality.md): INT4, groups of 128, the
    error-minimizing `mse` search, float16 parameters (4.25 bits per weight)."""

    bits: int = 4
    group_size: int = 128
    scheme: str = "asymmetric"
    method: str = "mse"
    param_dtype: str = "float16"

    def validate(self) -> "QuantSpec":
        """Raises ValidationError naming the field and what it allows; returns self."""
        check_spec(self.bits, self.group_size, self.scheme, self.method, self.param_dtype)
        return self

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with `changes` applied (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def superblock(self) -> bool:
        return self.param_dtype == "superblock"


#: The spec every default comes from.
DEFAULT_SPEC = QuantSpec()


def check_spec(bits: int, group_size: int, scheme: str, method: str = DEFAULT_SPEC.method,
               param_dtype: str = DEFAULT_SPEC.param_dtype) -> None:
    """ValidationError unless the five settings form a valid spec."""
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValidationError(f"bits must be 2, 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or \
            group_size <= 0:
        raise ValidationError(f"group size must be a positive integer, got {group_size!r}")
    if scheme not in VALID_SCHEMES:
        raise ValidationError(f"scheme must be 'asymmetric' or 'symmetric', got {scheme!r}")
    if method not in VALID_METHODS:
        raise ValidationError(f"method must be one of {VALID_METHODS}, got {method!r}")
    if param_dtype not in VALID_PARAM_DTYPES:
        raise ValidationError(
            f"param dtype must be 'float32', 'float16' or 'superblock', got {param_dtype!r}")
    if param_dtype == "superblock" and scheme != "asymmetric":
        raise ValidationError("param dtype 'superblock' needs the asymmetric scheme "
                              "(its zero codes carry the offset)")


# ---------------------------------------------------------------- geometry


def view_2d(shape: Sequence[int]) -> Tuple[int, int]:
    """(rows, cols) of FORMAT.md section 1: rows = d0, cols = N / d0."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(math.prod(shape[1:]))


class View2D:
    """rows / cols (FORMAT.md section 1) and numel of anything with a `shape`."""

    shape: Tuple[int, ...]

    @property
    def rows(self) -> int:
        return view_2d(self.shape)[0]

    @property
    def cols(self) -> int:
        return view_2d(self.shape)[1]

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


def groups_per_row(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def superblock_groups(group_size: int) -> int:
    """Groups per super-block: SUPERBLOCK_WEIGHTS // group_size, at least 1."""
    return max(1, SUPERBLOCK_WEIGHTS // int(group_size))


def superblock_code_bits(bits: int) -> int:
    """Bits of each group's scale and zero code: 4 at INT2, 6 at INT4 / INT8
    (what the engine writes; readers take the value stored with the tensor)."""
    return 4 if bits == 2 else 6


def superblocks_per_row(cols: int, group_size: int) -> int:
    return -(-groups_per_row(cols, group_size) // superblock_groups(group_size))


def param_code_bytes(groups: int, code_bits: int) -> int:
    """Bytes of the packed (scale code, zero code) stream of `groups` groups."""
    return (groups * 2 * code_bits + 7) // 8


def param_bytes(rows: int, cols: int, bits: int, group_size: int, param_dtype: str) -> int:
    """Bytes the group parameters of `rows` rows take in a V2 file: a scale
    and a zero point per group at 4 bytes (float32) or 2 (float16); with
    "superblock", two float16 units per super-block plus one packed stream of
    2 * p bits per group (p = 4 at INT2, 6 otherwise; FORMAT.md section 9).
    The stream is padded to a byte per V2 row, so a tensor stored in several
    chunks may take up to one byte more per extra chunk."""
    G = groups_per_row(cols, group_size)
    if param_dtype == "superblock":
        return rows * superblocks_per_row(cols, group_size) * 2 * 2 + \
            param_code_bytes(rows * G, superblock_code_bits(bits))
    return rows * G * 2 * (2 if param_dtype == "float16" else 4)


def stored_bytes(rows: int, cols: int, bits: int, group_size: int, param_dtype: str) -> int:
    """Bytes of `rows` quantized rows in a V2 file: packed codes (each row
    padded to a byte, FORMAT.md section 3) plus param_bytes()."""
    return rows * packed_row_bytes(cols, bits) + param_bytes(rows, cols, bits, group_size,
                                                             param_dtype)
