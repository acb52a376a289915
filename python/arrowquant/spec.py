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
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import ValidationError

VALID_BITS = (2, 4, 8)
VALID_SCHEMES = ("asymmetric", "symmetric")
VALID_METHODS = ("rtn", "mse", "grid-nl", "grid-learned")
#: Methods on a code grid (docs/FORMAT.md section 10): the mse search on the
#: fixed IQ4_NL-shaped 4-bit table ("grid-nl") or on a table learned per
#: tensor ("grid-learned"); V2 quant_type "grid<bits>", format version 3.
GRID_METHODS = {"grid-nl": "nl", "grid-learned": "learned"}
VALID_PARAM_DTYPES = ("float32", "float16", "superblock")

#: Two-level parameters (param_dtype "superblock", docs/FORMAT.md section 9):
#: the groups of a row are taken SUPERBLOCK_WEIGHTS // group_size at a time
#: (at least one); each super-block stores a float16 scale unit `d` and zero
#: point unit `dz`, each group a scale code `a` in [1, 2^p - 1] and a zero code
#: `c` in [0, 2^p - 1]; the group's parameters are `a * d` and `c * dz`
#: (float32 products, exact).
SUPERBLOCK_WEIGHTS = 256


#: The default (group size, method, parameter storage) of each bit width, as
#: measured on real model outputs (docs/quality.md, "Defaults"; issue 18):
#: INT4 -- rtn with superblock parameters, groups of 32 (4.5 bpw): better than
#: llama.cpp's Q4_0 at its size on MiniLM, the DCGAN and TAEF2 (mean and
#: worst), at 330-450 M weights/s per core;
#: INT8 -- the mse search, float16 parameters, groups of 64 (8.5 bpw, Q8_0's
#: size): above Q8_0 on all three, at 180-200 M weights/s per core;
#: INT2 -- the mse search with superblock parameters, groups of 16 (2.625
#: bpw, Q2_K's size): rtn ranges are far from optimal at 2 bits.
WIDTH_DEFAULTS: Dict[int, Tuple[int, str, str]] = {
    4: (32, "rtn", "superblock"),
    8: (64, "mse", "float16"),
    2: (16, "mse", "superblock"),
}


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized. The defaults are INT4's measured best
    trade-off per byte and per second (WIDTH_DEFAULTS, docs/quality.md):
    groups of 32, rtn, superblock parameters (4.5 bits per weight). Another
    width's defaults: default_spec(bits)."""

    bits: int = 4
    group_size: int = WIDTH_DEFAULTS[4][0]
    scheme: str = "asymmetric"
    method: str = WIDTH_DEFAULTS[4][1]
    param_dtype: str = WIDTH_DEFAULTS[4][2]

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

    @property
    def grid(self) -> Optional[str]:
        """The code grid ("nl" / "learned") of a grid method, else None."""
        return GRID_METHODS.get(self.method)

    @property
    def quant_type(self) -> str:
        """The V2 quant_type of tensors with this spec: "grid<bits>" on a code
        grid, else "int<bits>"."""
        return f"{'grid' if self.grid else 'int'}{self.bits}"


#: The spec every default comes from.
DEFAULT_SPEC = QuantSpec()

#: The fields WIDTH_DEFAULTS decides (each follows the bit width unless set).
WIDTH_FIELDS = ("group_size", "method", "param_dtype")


def default_spec(bits: int = DEFAULT_SPEC.bits, scheme: str = DEFAULT_SPEC.scheme,
                 param_dtype: Optional[str] = None) -> QuantSpec:
    """The default spec of a bit width (WIDTH_DEFAULTS). When the parameters
    cannot or are asked not to be superblock ones (the symmetric scheme, or
    `param_dtype` float16 / float32), the group doubles: float16 parameters
    at twice the group size take the same bits per weight at INT4 and INT8."""
    if bits not in WIDTH_DEFAULTS:
        raise ValidationError(f"bits must be 2, 4 or 8, got {bits!r}")
    group_size, method, default_pd = WIDTH_DEFAULTS[bits]
    pd = param_dtype or default_pd
    if pd == "superblock" and scheme != "asymmetric" and param_dtype is None:
        pd = "float16"
    if default_pd == "superblock" and pd != "superblock":
        group_size *= 2
    return QuantSpec(bits, group_size, scheme, method, pd)


def resolve_spec(bits: int = DEFAULT_SPEC.bits, group_size: Optional[int] = None,
                 scheme: str = DEFAULT_SPEC.scheme, method: Optional[str] = None,
                 param_dtype: Optional[str] = None) -> QuantSpec:
    """The spec of the given settings, the others (None) from default_spec(bits)
    -- what the array API and the pipeline do with what the caller left out."""
    if bits not in WIDTH_DEFAULTS:
        raise ValidationError(f"bits must be 2, 4 or 8, got {bits!r}")
    return default_spec(bits, scheme, param_dtype).replace(group_size=group_size, method=method)


def weighted_param_spec(group_size: int, param_dtype: str) -> Tuple[int, str]:
    """(group size, parameter storage) for the importance-weighted search,
    which stores float32 or float16 parameters only: superblock parameters
    become float16 at twice the group size (the same bits per weight at INT4
    and INT8: 12 / 32 + 32 / 256 = 32 / 64 + 0)."""
    if param_dtype == "superblock":
        return 2 * int(group_size), "float16"
    return int(group_size), param_dtype


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
    if method in GRID_METHODS and scheme != "asymmetric":
        raise ValidationError(f"method {method!r} (a code grid) needs the asymmetric scheme")
    if method == "grid-nl" and bits != 4:
        raise ValidationError(f"method 'grid-nl' is a 4-bit table, got bits={bits}; use "
                              "'grid-learned' at 2 or 8 bits")


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
