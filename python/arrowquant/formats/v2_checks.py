"""Row checks of the V2 reader (FORMAT.md sections 5 and 9): the format
version, the superblock layout, the expansion of stored units and codes with
every stored value checked, equalization scales, and chunk coverage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np

from ..engine.superblock import expand_superblock, unpack_codes
from ..errors import FormatError, ShapeMismatchError, ValidationError
from ..spec import param_code_bytes, view_2d
from .arrow_checks import MAX_NUMEL
from .v2_schema import FORMAT_VERSION, GRID_QUANT_TYPES, READABLE_VERSIONS

if TYPE_CHECKING:
    from .v2_reader import TensorEntry

#: Largest param_code_bits (codes are at most one byte).
MAX_CODE_BITS = 8


def check_version(f: Path, value: Optional[bytes]) -> int:
    """The file's arrowquant.format_version (absent: 1); FormatError for a
    version this reader does not know (a newer writer's file)."""
    if value is None:
        return FORMAT_VERSION
    try:
        version = int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{f}: arrowquant.format_version {value!r} is not a number") from None
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{f}: ArrowQuant Parquet V2 format version {version}; this reader "
                          f"reads versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade "
                          "arrowquant to read it)")
    return version


def check_code_levels(where: str, quant_type: str, levels: Any) -> Optional[np.ndarray]:
    """A row's code_levels (FORMAT.md 10.3): present exactly on grid rows,
    2^b finite, strictly increasing float32 levels from 0 to 2^b - 1."""
    bits = GRID_QUANT_TYPES.get(quant_type)
    if bits is None:
        if levels is not None:
            raise FormatError(f"{where}: code_levels set on a {quant_type!r} row (only grid "
                              "rows have a table)")
        return None
    if levels is None:
        raise FormatError(f"{where}: quant_type {quant_type!r} with a null code_levels")
    if not isinstance(levels, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in levels):
        raise FormatError(f"{where}: code_levels must be a list of numbers")
    L = np.asarray(levels, dtype=np.float64)
    Q = (1 << bits) - 1
    if L.size != Q + 1:
        raise FormatError(f"{where}: code_levels holds {L.size} levels, a {bits}-bit grid has "
                          f"{Q + 1}")
    L32 = L.astype(np.float32)
    if not np.isfinite(L).all() or not np.array_equal(L32.astype(np.float64), L):
        raise ValidationError(f"{where}: code_levels must be finite float32 values")
    if not (np.diff(L32) > 0).all():
        raise ValidationError(f"{where}: code_levels must be strictly increasing")
    if L32[0] != 0 or L32[Q] != Q:
        raise ValidationError(f"{where}: code_levels must run from 0 to {Q} (L[0] = {L32[0]}, "
                              f"L[{Q}] = {L32[Q]})")
    return L32


def check_superblock_layout(where: str, p: Any, K: Any) -> None:
    """param_code_bits and superblock_groups: both null, or p in 1..8 and K >= 1."""
    if p is None and K is None:
        return
    if p is None or K is None:
        raise FormatError(f"{where}: param_code_bits {p!r} and superblock_groups {K!r}: one is "
                          "null, the other not")
    if not isinstance(p, int) or not 1 <= p <= MAX_CODE_BITS:
        raise FormatError(f"{where}: param_code_bits {p!r} outside 1..{MAX_CODE_BITS}")
    if not isinstance(K, int) or K < 1 or K > MAX_NUMEL:
        raise FormatError(f"{where}: superblock_groups {K!r} must be a positive integer")


def expand_chunk(where: str, d: np.ndarray, dz: np.ndarray, codes: Optional[np.ndarray], p: int,
                 K: int, row_count: int, G: int) -> Dict[str, np.ndarray]:
    """Per-group float32 parameters of a superblock chunk (FORMAT.md section
    9), every stored value checked: unit and code counts, finite float16
    units with d > 0 and dz >= 0, scale codes >= 1, zero padding bits."""
    S = -(-G // K)
    if codes is None:
        raise FormatError(f"{where}: param_codes is null in a superblock row")
    for label, v in (("scale", d), ("zero", dz)):
        if v.size != row_count * S:
            raise ShapeMismatchError(f"{where}: {v.size} superblock {label} units, expected "
                                     f"{row_count} rows x {S} super-blocks")
    need = param_code_bytes(row_count * G, p)
    if codes.size != need:
        raise ShapeMismatchError(f"{where}: param_codes holds {codes.size} bytes, {row_count} rows "
                                 f"x {G} groups of {p}-bit code pairs need {need}")
    units = []
    for label, stored in (("scale", d), ("zero", dz)):
        v = stored.astype(np.float32)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v <= 0 if label == "scale" else v < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            rule = "finite and > 0" if label == "scale" else "finite and >= 0"
            raise ValidationError(f"{where}: superblock {label} unit {i} is {v[i]} (must be {rule})")
        if stored.dtype != np.float16:
            with np.errstate(over="ignore"):
                off = v.astype(np.float16).astype(np.float32) != v
            if off.any():
                i = int(np.flatnonzero(off)[0])
                raise ValidationError(f"{where}: superblock {label} unit {i} = {v[i]!r} is not a "
                                      "float16 value")
        units.append(v)
    d32, dz32 = units
    try:
        a, c = unpack_codes(codes, row_count * G, p)
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc}") from None
    if a.size and int(a.min()) < 1:
        i = int(np.flatnonzero(a == 0)[0])
        raise ValidationError(f"{where}: scale code of group {i} is 0 (scale codes are >= 1)")
    scales, zeros = expand_superblock(d32, dz32, a, c, row_count, G, K)
    return {"scales": scales, "zero_points": zeros, "sb_scales": d32, "sb_zero_points": dz32}


def equalization_scales(where: str, text: str, cols: int) -> np.ndarray:
    """The `scales` of a spatial_quant_json (FORMAT.md 8.2): C finite, positive values."""
    try:
        spec = json.loads(text)
        s = np.asarray(spec.get("scales", []) if isinstance(spec, dict) else None,
                       dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{where}: spatial_quant_json unusable ({exc})") from None
    if s.ndim != 1 or (s.size and s.size != cols):
        raise ShapeMismatchError(f"{where}: spatial_quant_json has {s.size} scales for {cols} "
                                 "columns")
    if s.size and not (np.isfinite(s).all() and (s > 0).all()):
        raise ValidationError(f"{where}: spatial_quant_json scales must be finite and positive")
    return s


def check_coverage(entry: TensorEntry) -> None:
    """Chunks cover rows 0..R of the 2-D view once each, in order, with no gap or overlap."""
    rows, _ = view_2d(entry.shape)
    expect = 0
    for c in sorted(entry.chunks, key=lambda c: (c.row_start, c.row_count)):
        if c.row_start != expect:
            kind = "overlap" if c.row_start < expect else "gap"
            raise FormatError(f"{c.file}: tensor {entry.name!r}: chunks {kind} (expected row "
                              f"{expect}, found a chunk starting at row {c.row_start})")
        if c.row_count == 0 and rows != 0:
            raise FormatError(f"{c.file}: tensor {entry.name!r}: empty chunk at row {c.row_start}")
        expect += c.row_count
    if expect != rows:
        raise FormatError(f"{entry.chunks[0].file}: tensor {entry.name!r}: chunks cover "
                          f"{expect} of {rows} rows")
