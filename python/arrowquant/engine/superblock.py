"""Two-level ("superblock") parameters, docs/FORMAT.md section 9: per-group
scales and zero points as codes times super-block units, and the packed
param_codes stream a V2 row stores. The one packer of that stream: the V2
writer, the readers, the staging parts and the numpy reference all use it."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import QuantizationError, ValidationError
from ..spec import (groups_per_row, param_code_bytes, superblock_code_bits,
                    superblock_groups)


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


def pack_codes(scale_codes: np.ndarray, zero_codes: np.ndarray, code_bits: int) -> np.ndarray:
    """The param_codes stream (FORMAT.md 9.3) of these codes: the same bytes as
    pack_param_codes, with direct paths for the widths the engine writes."""
    a = np.asarray(scale_codes, dtype=np.uint8).reshape(-1)
    c = np.asarray(zero_codes, dtype=np.uint8).reshape(-1)
    if code_bits == 4:
        return (a & 15) | ((c & 15) << 4)
    if code_bits == 8:
        return np.stack([a, c], axis=1).reshape(-1)
    if code_bits == 6:
        n = a.size
        if n % 2:
            a, c = np.append(a, np.uint8(0)), np.append(c, np.uint8(0))
        a32, c32 = a.astype(np.uint32) & 63, c.astype(np.uint32) & 63
        v = a32[0::2] | (c32[0::2] << 6) | (a32[1::2] << 12) | (c32[1::2] << 18)
        out = np.stack([v & 255, (v >> 8) & 255, v >> 16], axis=1).astype(np.uint8).reshape(-1)
        return out[:param_code_bytes(n, 6)]
    return pack_param_codes(a, c, code_bits)


def unpack_codes(stream: np.ndarray, groups: int, code_bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(scale codes, zero codes) of a param_codes stream; ValidationError for
    a wrong length or a non-zero padding bit (as tensor.unpack_param_codes)."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    need = param_code_bytes(groups, code_bits)
    if stream.size != need:
        raise ValidationError(f"param_codes holds {stream.size} bytes, {groups} groups of "
                              f"{code_bits}-bit codes need {need}")
    tail = (groups * 2 * code_bits) % 8
    if tail and int(stream[-1]) >> tail:
        raise ValidationError("param_codes: padding bits after the last code are not zero")
    if code_bits == 4:
        return stream & 15, stream >> 4
    if code_bits == 8:
        return stream[0::2].copy(), stream[1::2].copy()
    if code_bits == 6:
        pairs = -(-groups // 2)
        b = np.zeros(pairs * 3, dtype=np.uint32)
        b[:stream.size] = stream
        v = b[0::3] | (b[1::3] << 8) | (b[2::3] << 16)
        a = np.stack([v & 63, (v >> 12) & 63], axis=1).reshape(-1)[:groups].astype(np.uint8)
        c = np.stack([(v >> 6) & 63, (v >> 18) & 63], axis=1).reshape(-1)[:groups].astype(np.uint8)
        return a, c
    return unpack_param_codes(stream, groups, code_bits)


def _per_group(units: np.ndarray, rows: int, S: int, K: int, G: int) -> np.ndarray:
    """(rows, G): each group's super-block unit."""
    return np.repeat(units.reshape(rows, S), K, axis=1)[:, :G]


def superblock_params(name: str, rows: int, cols: int, bits: int, group_size: int,
                      scales: np.ndarray, zero_points: np.ndarray, sb_scales: np.ndarray,
                      sb_zero_points: np.ndarray) -> np.ndarray:
    """The param_codes stream of a chunk that the engine quantized with
    two-level parameters (expanded per-group `scales` / `zero_points` and the
    units). Checks that the units and the codes they imply are what the file
    can hold and expand back to exactly the parameters the codes were made
    with; anything else is an engine fault (QuantizationError), never written."""
    G = groups_per_row(cols, group_size)
    K = superblock_groups(group_size)
    S = -(-G // K)
    p = superblock_code_bits(bits)
    top = (1 << p) - 1
    where = f"tensor {name!r}"
    s = np.asarray(scales, dtype=np.float32).reshape(rows, G)
    z = np.asarray(zero_points, dtype=np.float32).reshape(rows, G)
    d = np.asarray(sb_scales, dtype=np.float32).reshape(-1)
    dz = np.asarray(sb_zero_points, dtype=np.float32).reshape(-1)
    if d.size != rows * S or dz.size != rows * S:
        raise QuantizationError(f"{where}: superblock units of {d.size} and {dz.size} values, "
                                f"{rows} rows x {S} super-blocks expected")
    if not (np.isfinite(d).all() and (d > 0).all() and np.isfinite(dz).all() and (dz >= 0).all()):
        raise QuantizationError(f"{where}: superblock units must be finite, scale units > 0 and "
                                "zero units >= 0")
    if not (np.array_equal(d.astype(np.float16).astype(np.float32), d)
            and np.array_equal(dz.astype(np.float16).astype(np.float32), dz)):
        raise QuantizationError(f"{where}: superblock units are not float16 values")
    dg = _per_group(d, rows, S, K, G)
    dzg = _per_group(dz, rows, S, K, G)
    a = np.rint(s / dg)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dzg > 0, np.rint(z / dzg), np.float32(0))
    if not (np.isfinite(a).all() and np.isfinite(c).all() and a.min(initial=1) >= 1
            and a.max(initial=1) <= top and c.min(initial=0) >= 0 and c.max(initial=0) <= top):
        raise QuantizationError(f"{where}: superblock codes outside [1, {top}] / [0, {top}]")
    # The expansion must give the engine's values (a zero point of -0 and one
    # of +0 dequantize alike, so values, not bits, are compared).
    if not (np.array_equal(dg * a.astype(np.float32), s)
            and np.array_equal(dzg * c.astype(np.float32), z)):
        raise QuantizationError(f"{where}: superblock parameters do not expand to the scales and "
                                "zero points the codes were made with")
    return pack_codes(a.astype(np.uint8), c.astype(np.uint8), p)
