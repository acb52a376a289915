"""In-memory quantized tensors and the shared rules for reading a user's
array (dtype names, the 2-D view of FORMAT.md section 1, validation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .errors import ValidationError

#: dtypes the quantizer accepts, with their element size in bytes.
QUANTIZABLE_DTYPES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_DTYPE_ALIASES = {
    "f32": "float32", "float": "float32", "F32": "float32",
    "f16": "float16", "half": "float16", "F16": "float16",
    "bf16": "bfloat16", "BF16": "bfloat16",
    "float8_e4m3": "float8_e4m3fn", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
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


def canonical_dtype(name: str) -> str:
    """Canonical dtype name for `name`, or ValidationError."""
    name = _DTYPE_ALIASES.get(name, name)
    if name not in QUANTIZABLE_DTYPES:
        raise ValidationError(
            f"dtype {name!r} cannot be quantized; expected one of {', '.join(QUANTIZABLE_DTYPES)}"
        )
    return name


def view_2d(shape: Sequence[int]) -> Tuple[int, int]:
    """(rows, cols) of FORMAT.md section 1: rows = d0, cols = N / d0."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rows = shape[0]
    cols = int(math.prod(shape[1:]))
    return rows, cols


def groups_per_row(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def check_spec(bits: int, group_size: int, scheme: str, method: str = "rtn",
               param_dtype: str = "float32") -> None:
    if bits not in VALID_BITS:
        raise ValidationError(f"bits must be 2, 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
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


def pack_param_codes(scale_codes: np.ndarray, zero_codes: np.ndarray, code_bits: int) -> np.ndarray:
    """The param_codes stream: for each group in row-major order its scale
    code then its zero code, `code_bits` each, as one little-endian bit stream
    (code k occupies bits k*p .. k*p+p-1, bit 0 = least significant bit of
    byte 0); the unused high bits of the last byte are zero."""
    a = np.asarray(scale_codes, dtype=np.uint8).reshape(-1)
    c = np.asarray(zero_codes, dtype=np.uint8).reshape(-1)
    codes = np.empty(a.size * 2, dtype=np.uint8)
    codes[0::2] = a
    codes[1::2] = c
    bits = ((codes[:, None] >> np.arange(code_bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_param_codes(stream: np.ndarray, groups: int,
                       code_bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(scale codes, zero codes) of `groups` groups from a param_codes stream
    (ValidationError when its length is not param_code_bytes(groups, code_bits)
    or the padding bits are not zero)."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    need = param_code_bytes(groups, code_bits)
    if stream.size != need:
        raise ValidationError(
            f"param_codes holds {stream.size} bytes, {groups} groups of {code_bits}-bit codes "
            f"need {need}")
    bits = np.unpackbits(stream, bitorder="little")
    used = groups * 2 * code_bits
    if bits[used:].any():
        raise ValidationError("param_codes: padding bits after the last code are not zero")
    weights = (1 << np.arange(code_bits, dtype=np.uint16)).astype(np.uint16)
    codes = (bits[:used].reshape(-1, code_bits).astype(np.uint16) * weights).sum(
        axis=1).astype(np.uint8)
    return codes[0::2].copy(), codes[1::2].copy()


def _units_per_group(sb_scales: np.ndarray, sb_zero_points: np.ndarray, rows: int, groups: int,
                     sb_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each group's (scale unit, zero unit) as (rows, groups) float32 arrays."""
    S = -(-groups // sb_groups)
    sb_of = np.arange(groups) // sb_groups
    d = np.asarray(sb_scales, dtype=np.float32).reshape(rows, S)[:, sb_of]
    dz = np.asarray(sb_zero_points, dtype=np.float32).reshape(rows, S)[:, sb_of]
    return d, dz


def expand_superblock(sb_scales: np.ndarray, sb_zero_points: np.ndarray, scale_codes: np.ndarray,
                      zero_codes: np.ndarray, rows: int, groups: int,
                      sb_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-group float32 (scales, zero points), index r * G + j: scale code
    times its super-block's unit, zero code times its zero unit. Both
    products are exact in float32 (an 11-bit float16 significand times a code
    of at most 8 bits), so the expansion is what the engine used."""
    d, dz = _units_per_group(sb_scales, sb_zero_points, rows, groups, sb_groups)
    a = np.asarray(scale_codes).reshape(rows, groups).astype(np.float32)
    c = np.asarray(zero_codes).reshape(rows, groups).astype(np.float32)
    return (d * a).reshape(-1).astype(np.float32), (dz * c).reshape(-1).astype(np.float32)


def superblock_codes(scales: np.ndarray, zero_points: np.ndarray, sb_scales: np.ndarray,
                     sb_zero_points: np.ndarray, rows: int, groups: int,
                     sb_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """The (scale codes, zero codes) behind expanded parameters: the exact
    quotients scale / d and zero point / dz (an expansion inverted)."""
    d, dz = _units_per_group(sb_scales, sb_zero_points, rows, groups, sb_groups)
    a = np.asarray(scales, dtype=np.float32).reshape(rows, groups) / d
    zp = np.asarray(zero_points, dtype=np.float32).reshape(rows, groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dz > 0, zp / dz, np.float32(0))  # a zero unit of 0: every code is 0
    return a.reshape(-1).astype(np.uint8), c.reshape(-1).astype(np.uint8)


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


@dataclass(frozen=True)
class ErrorMetrics:
    """What a tensor lost: cosine similarity, relative MSE, SQNR (dB), max abs error."""

    cosine: float
    rel_mse: float
    sqnr_db: float
    max_abs_error: float

    def as_dict(self) -> dict:
        return {
            "cosine": self.cosine,
            "rel_mse": self.rel_mse,
            "sqnr_db": self.sqnr_db,
            "max_abs_error": self.max_abs_error,
        }


@dataclass
class ErrorSums:
    """Mergeable sums behind ErrorMetrics (a tensor done in chunks adds them up)."""

    sum_x2: float = 0.0
    sum_xhat2: float = 0.0
    sum_x_xhat: float = 0.0
    sum_err2: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0

    def merge(self, other: "ErrorSums") -> None:
        self.sum_x2 += other.sum_x2
        self.sum_xhat2 += other.sum_xhat2
        self.sum_x_xhat += other.sum_x_xhat
        self.sum_err2 += other.sum_err2
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.count += other.count

    def as_tuple(self) -> tuple:
        return (self.sum_x2, self.sum_xhat2, self.sum_x_xhat, self.sum_err2, self.max_abs_err,
                self.count)

    def metrics(self) -> ErrorMetrics:
        x2, h2, xh, e2 = self.sum_x2, self.sum_xhat2, self.sum_x_xhat, self.sum_err2
        denom = math.sqrt(x2) * math.sqrt(h2)
        if denom > 0:
            cosine = xh / denom
            # Rounding can step past 1; a non-finite one (an overflowed
            # reconstruction: inf / inf) stays NaN, never a perfect 1.
            if math.isfinite(cosine):
                cosine = max(-1.0, min(1.0, cosine))
            else:
                cosine = math.nan
        else:
            cosine = 1.0 if (x2 == 0 and h2 == 0) else 0.0
        rel = e2 / x2 if x2 > 0 else (math.inf if e2 > 0 else 0.0)
        if e2 > 0:
            ratio = x2 / e2
            sqnr = -math.inf if ratio == 0 else 10.0 * math.log10(ratio) if ratio == ratio else math.nan
        else:
            sqnr = math.inf
        return ErrorMetrics(cosine=cosine, rel_mse=rel, sqnr_db=sqnr, max_abs_error=self.max_abs_err)


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
        a, c = superblock_codes(self.scales, self.zero_points, self.superblock_scales,
                                self.superblock_zero_points, self.rows, self.groups_per_row,
                                self.superblock_groups)
        return pack_param_codes(a, c, self.param_code_bits)

    @property
    def metrics(self) -> Optional[ErrorMetrics]:
        return None if self.error is None else self.error.metrics()

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes plus parameters at their storage precision."""
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
