"""The importance-weighted parameter search of cpp/src/importance.cc in numpy.

Same candidates in the same order, the same float32 arithmetic and the same
column-order double sums (np.cumsum accumulates sequentially), so the chosen
scales and zero points agree with the engine bit for bit. Vectorized over all
groups of a tensor; the only Python loop runs over the candidates of the grid.
It is the test oracle of arrowquant.importance, not a fast path."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..engine.dtypes import to_float32
from ..engine.tensor import QuantizedTensor, as_source
from ..errors import ValidationError
from ..spec import check_spec, groups_per_row
from ..engine.metrics import ErrorSums
from .rtn import _check_finite, choose_params, dequantize_codes, encode, pack

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

GRID_STEPS = 10
MAX_CLIP = 0.5
REFIT_ITERS = 3
REFIT_ALL = True


def _round_storage(s: np.ndarray, z: np.ndarray, param_dtype: str) -> Tuple[np.ndarray, np.ndarray]:
    if param_dtype == "float16":
        with np.errstate(all="ignore"):
            return (s.astype(np.float16).astype(np.float32), z.astype(np.float16).astype(np.float32))
    return s, z


def _usable(s: np.ndarray, z: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return (s > _F0) & np.isfinite(s) & np.isfinite(_F1 / s) & np.isfinite(z)


def _codes(x: np.ndarray, s: np.ndarray, z: np.ndarray, q_max: np.float32, symmetric: bool) -> np.ndarray:
    """(N, n) float32 codes for per-group (N,) parameters, as the encoder."""
    with np.errstate(all="ignore"):
        inv = (_F1 / s)[:, None]
        zz = z[:, None]
        v = np.rint(x * inv) + zz if symmetric else np.rint(x * inv + zz)
        return np.clip(v, _F0, q_max)


def _weighted_error(x: np.ndarray, w: np.ndarray, s: np.ndarray, z: np.ndarray, q_max: np.float32,
                    symmetric: bool) -> np.ndarray:
    q = _codes(x, s, z, q_max, symmetric)
    with np.errstate(all="ignore"):
        xhat = (q - z[:, None]) * s[:, None]
        e = x.astype(np.float64) - xhat.astype(np.float64)
        return np.cumsum(w.astype(np.float64) * e * e, axis=1)[:, -1]


def _refit(x: np.ndarray, w: np.ndarray, s: np.ndarray, z: np.ndarray, q_max: np.float32,
           symmetric: bool, param_dtype: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares (scale, zero) for the codes of (s, z); returns
    the new parameters and a mask of the groups where the refit is usable."""
    q = _codes(x, s, z, q_max, symmetric)
    w64 = w.astype(np.float64)
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        if symmetric:
            qd = (q - z[:, None]).astype(np.float64)
            wq = w64 * qd
            sqq = np.cumsum(wq * qd, axis=1)[:, -1]
            sqx = np.cumsum(wq * x64, axis=1)[:, -1]
            ok = sqq > 0.0
            rs = np.where(ok, sqx / np.where(ok, sqq, 1.0), 1.0).astype(np.float32)
            rz = z.copy()
        else:
            qd = q.astype(np.float64)
            wq = w64 * qd
            sw = np.cumsum(w64, axis=1)[:, -1]
            sq = np.cumsum(wq, axis=1)[:, -1]
            sqq = np.cumsum(wq * qd, axis=1)[:, -1]
            sx = np.cumsum(w64 * x64, axis=1)[:, -1]
            sqx = np.cumsum(wq * x64, axis=1)[:, -1]
            det = sw * sqq - sq * sq
            ok = det > 0.0
            a = (sw * sqx - sq * sx) / np.where(ok, det, 1.0)
            b = (sx - a * sq) / np.where(ok, sw, 1.0)
            ok &= a > 0.0
            safe_a = np.where(ok, a, 1.0)
            rs = safe_a.astype(np.float32)
            rz = (-b / safe_a).astype(np.float32)
        rs, rz = _round_storage(rs, rz, param_dtype)
        ok &= _usable(rs, rz)
    return rs, rz, ok


def _search_groups(x: np.ndarray, w: np.ndarray, s0: np.ndarray, z0: np.ndarray, bits: int,
                   symmetric: bool, param_dtype: str, grid_steps: int, max_clip: float,
                   refit_iters: int, refit_all: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Search over N groups of n elements: x, w (N, n) float32; rtn (N,)."""
    q_max = np.float32(2**bits - 1)
    best_s, best_z = _round_storage(s0.copy(), z0.copy(), param_dtype)
    best_e = _weighted_error(x, w, best_s, best_z, q_max, symmetric)
    active = best_e > 0.0

    def take(mask: np.ndarray, s: np.ndarray, z: np.ndarray, e: np.ndarray) -> None:
        nonlocal best_s, best_z, best_e
        best_s = np.where(mask, s, best_s)
        best_z = np.where(mask, z, best_z)
        best_e = np.where(mask, e, best_e)

    def consider(mask: np.ndarray, s: np.ndarray, z: np.ndarray) -> None:
        s, z = _round_storage(s, z, param_dtype)
        mask = mask & _usable(s, z)
        safe_s = np.where(mask, s, _F1)
        safe_z = np.where(mask, z, _F0)
        e = _weighted_error(x, w, safe_s, safe_z, q_max, symmetric)
        take(mask & (e < best_e), s, z, e)
        if refit_all:
            rs, rz, ok = _refit(x, w, safe_s, safe_z, q_max, symmetric, param_dtype)
            ok &= mask
            er = _weighted_error(x, w, np.where(ok, rs, _F1), np.where(ok, rz, _F0), q_max, symmetric)
            take(ok & (er < best_e), rs, rz, er)

    K = np.float32(grid_steps)
    mc = np.float32(max_clip)
    with np.errstate(all="ignore"):
        if symmetric:
            a = np.max(np.abs(x), axis=1)
            m = np.float32(2 ** (bits - 1) - 1)
            zero = np.full_like(a, np.float32(2 ** (bits - 1)))
            grid_mask = active & (a > _F0)
            for k in range(1, grid_steps + 1):
                f = np.float32(k) * mc / K
                consider(grid_mask, (a * (_F1 - f)) / m, zero)
        else:
            lo = np.min(x, axis=1) + _F0
            hi = np.max(x, axis=1) + _F0
            rng = hi - lo
            grid_mask = active & (hi > lo) & np.isfinite(rng)
            for k in range(1, grid_steps + 1):
                f = np.float32(k) * mc / K
                half = f * np.float32(0.5)
                variants = ((lo + half * rng, hi - half * rng), (lo + f * rng, hi), (lo, hi - f * rng))
                for lo_c, hi_c in variants:
                    s = (hi_c - lo_c) / q_max
                    m_ok = grid_mask & (s > _F0)
                    safe_s = np.where(m_ok, s, _F1)
                    consider(m_ok, s, -lo_c / safe_s)

    still = active.copy()
    for _ in range(refit_iters):
        rs, rz, ok = _refit(x, w, best_s, best_z, q_max, symmetric, param_dtype)
        ok &= still
        er = _weighted_error(x, w, np.where(ok, rs, _F1), np.where(ok, rz, _F0), q_max, symmetric)
        better = ok & (er < best_e)
        take(better, rs, rz, er)
        still = better
        if not still.any():
            break
    return best_s, best_z


def importance_params(x2: np.ndarray, importance: np.ndarray, *, bits: int, group_size: int,
                      scheme: str = "asymmetric", param_dtype: str = "float32",
                      grid_steps: int = GRID_STEPS, max_clip: float = MAX_CLIP,
                      refit_iters: int = REFIT_ITERS, refit_all: bool = REFIT_ALL,
                      name: str = "tensor") -> Tuple[np.ndarray, np.ndarray]:
    """Scales and zero points (R, G) float32 for an (R, C) float32 matrix."""
    rows, cols = x2.shape
    w = np.asarray(importance, dtype=np.float32).reshape(-1)
    if w.size != cols:
        raise ValidationError(f"tensor {name!r}: importance has {w.size} entries, {cols} columns")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValidationError(f"tensor {name!r}: importance must be finite and non-negative")
    # Start from rtn as stored (float16 rules of FORMAT.md section 7).
    s0, z0 = choose_params(x2, bits, group_size, scheme, "rtn", param_dtype, name)
    G = groups_per_row(cols, group_size)
    full = cols // group_size
    symmetric = scheme == "symmetric"
    out_s = np.empty((rows, G), dtype=np.float32)
    out_z = np.empty((rows, G), dtype=np.float32)
    parts = []
    if full:
        parts.append((slice(0, full * group_size), slice(0, full), full, group_size))
    if cols % group_size:
        parts.append((slice(full * group_size, cols), slice(full, G), 1, cols - full * group_size))
    for cs, gs, ng, n in parts:
        xg = np.ascontiguousarray(x2[:, cs]).reshape(rows * ng, n)
        wg = np.broadcast_to(w[cs].reshape(1, ng, n), (rows, ng, n)).reshape(rows * ng, n)
        s, z = _search_groups(xg, wg, s0[:, gs].reshape(-1), z0[:, gs].reshape(-1), bits,
                              symmetric, param_dtype, grid_steps, max_clip, refit_iters, refit_all)
        out_s[:, gs] = s.reshape(rows, ng)
        out_z[:, gs] = z.reshape(rows, ng)
    return out_s, out_z


def quantize_importance(array: Any, importance: np.ndarray, *, bits: int = 4, group_size: int = 128,
                        scheme: str = "asymmetric", param_dtype: str = "float32",
                        dtype: Optional[str] = None, name: str = "tensor",
                        grid_steps: int = GRID_STEPS, max_clip: float = MAX_CLIP,
                        refit_iters: int = REFIT_ITERS, refit_all: bool = REFIT_ALL) -> QuantizedTensor:
    """numpy twin of the engine's quantize_importance (method "importance")."""
    check_spec(bits, group_size, scheme, "rtn", param_dtype)
    src = as_source(array, dtype=dtype, name=name)
    rows, cols = src.rows, src.cols
    x = to_float32(src.raw, src.dtype)
    _check_finite(x, cols, name)
    x2 = x.reshape(rows, cols)
    scale, zero = importance_params(x2, importance, bits=bits, group_size=group_size, scheme=scheme,
                                    param_dtype=param_dtype, grid_steps=grid_steps,
                                    max_clip=max_clip, refit_iters=refit_iters,
                                    refit_all=refit_all, name=name)
    codes = encode(x2, bits, group_size, scheme, scale, zero)
    xhat = dequantize_codes(codes, scale, zero, group_size)
    return QuantizedTensor(
        data=pack(codes, bits), scales=scale.reshape(-1), zero_points=zero.reshape(-1),
        shape=src.shape, dtype=src.dtype, bits=bits, group_size=group_size, scheme=scheme,
        method="importance", param_dtype=param_dtype, name=name, error=ErrorSums.of(x2, xhat),
    )
