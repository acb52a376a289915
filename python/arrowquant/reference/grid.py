"""Code grids (docs/FORMAT.md section 10) in numpy: the table of levels, the
codes, dequantization, the parameter search on a grid and the learned
(Lloyd) table. Bit-exact twin of cpp/src/grid.cc: the same float32
element operations, the same candidates in the same order and the same
summation orders (float32 errors in eight lanes as section 7; float64 refit
and Lloyd sums sequential in element order, written as cumulative sums so
that numpy adds in that order too).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..engine.grid import GRIDS, NL_LEVELS, NL_VALUES, GridQuant  # noqa: F401 (re-exported)
from ..errors import ValidationError
from .search import _reduce8, representable, round_f16, round_scale_f16

#: Range fractions of the candidates (FORMAT.md 10.4, step 1), in order.
GRID_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
#: Least-squares refits of the best candidate (step 2).
GRID_REFITS = 2
#: Lloyd iterations of the learned table.
LLOYD_ITERS = 8



def fixed_levels(grid: str, bits: int) -> np.ndarray:
    if grid == "nl" and bits == 4:
        return NL_LEVELS.copy()
    raise ValidationError(f"grid {grid!r} has no fixed table at {bits} bits (only 'nl' at 4)")


def check_levels(levels: np.ndarray, bits: int, name: str = "tensor") -> np.ndarray:
    """FORMAT.md 10.1's rules; the table as float32."""
    L = np.asarray(levels, dtype=np.float32).reshape(-1)
    Q = (1 << bits) - 1
    if L.size != Q + 1:
        raise ValidationError(f"{name}: a {bits}-bit grid has {Q + 1} levels, got {L.size}")
    if not np.all(np.isfinite(L)) or not np.all(np.diff(L) > 0) or L[0] != 0 or L[-1] != Q:
        raise ValidationError(f"{name}: grid levels must be finite, strictly increasing, "
                              f"from 0 to {Q}")
    return L


def midpoints(levels: np.ndarray) -> np.ndarray:
    L = levels.astype(np.float32)
    return ((L[:-1] + L[1:]) * np.float32(0.5)).astype(np.float32)


def codes_of(x: np.ndarray, s: np.ndarray, z: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """q = #{k : x * (1/s) + z > t[k]} (FORMAT.md 10.2); s, z broadcast."""
    with np.errstate(all="ignore"):
        inv = (np.float32(1.0) / s).astype(np.float32)
        u = (x * inv).astype(np.float32) + z
    return np.searchsorted(midpoints(levels), u.astype(np.float32), side="left").astype(np.uint8)


def decode(q: np.ndarray, s: np.ndarray, z: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """x_hat = (L[q] - z) * s, float32."""
    return ((levels.astype(np.float32)[q] - z).astype(np.float32) * s).astype(np.float32)


def dequantize(gq: GridQuant) -> np.ndarray:
    """x_hat of a GridQuant (rows, cols), float32."""
    rows, cols = gq.codes.shape
    G = -(-cols // gq.group_size)
    col_group = np.arange(cols) // gq.group_size
    s = gq.scales.reshape(rows, G)[:, col_group]
    z = gq.zero_points.reshape(rows, G)[:, col_group]
    return decode(gq.codes, s, z, gq.levels)


def _groups(x2: np.ndarray, g: int, w: Optional[np.ndarray]) -> Tuple[np.ndarray, ...]:
    """(N, P) groups of x and w (P = g rounded up to 8, padding w = 0, x = 0) and valid mask."""
    rows, cols = x2.shape
    G = -(-cols // g)
    P = -(-g // 8) * 8
    xs = np.zeros((rows, G * g), np.float32)
    xs[:, :cols] = x2
    valid = np.zeros((rows, G * g), bool)
    valid[:, :cols] = True
    ws = np.zeros(G * g, np.float32)
    ws[:cols] = 1.0 if w is None else w
    xg = np.zeros((rows * G, P), np.float32)
    vg = np.zeros((rows * G, P), bool)
    wg = np.zeros((rows * G, P), np.float32)
    xg[:, :g] = xs.reshape(rows * G, g)
    vg[:, :g] = valid.reshape(rows * G, g)
    wg[:, :g] = np.broadcast_to(ws.reshape(G, g), (rows, G, g)).reshape(rows * G, g)
    wg[~vg] = 0.0
    return xg, vg, wg


def _err(xg, vg, wg, q, s, z, levels) -> np.ndarray:
    """Weighted squared error per group, float32 terms in eight lanes (the
    padding adds +0)."""
    with np.errstate(all="ignore"):
        d = (xg - decode(q, s[:, None], z[:, None], levels)).astype(np.float32)
        term = (wg * (d * d).astype(np.float32)).astype(np.float32)
    term = np.where(vg, term, np.float32(0)).astype(np.float32)
    N, P = term.shape
    lanes = np.cumsum(term.reshape(N, P // 8, 8), axis=1, dtype=np.float32)[:, -1, :]
    return _reduce8(lanes)


def _round(s: np.ndarray, z_of, f16: bool) -> Tuple[np.ndarray, np.ndarray]:
    if f16:
        s = round_scale_f16(s)
    with np.errstate(all="ignore"):
        z = z_of(s).astype(np.float32)
    if f16:
        z = round_f16(z)
    return s.astype(np.float32), z


def search_params(xg, vg, wg, levels, bits: int, f16: bool) -> Tuple[np.ndarray, np.ndarray]:
    """FORMAT.md 10.4: the best (s, z) per group."""
    Q = np.float32((1 << bits) - 1)
    big = np.float32(np.inf)
    lo = np.where(vg, xg, big).min(axis=1).astype(np.float32)
    hi = np.where(vg, xg, -big).max(axis=1).astype(np.float32)
    const = ~(hi > lo)
    best_s = np.zeros(len(xg), np.float32)
    best_z = np.zeros(len(xg), np.float32)
    best_e = np.full(len(xg), np.inf, np.float32)

    def consider(s, z, ok):
        ok = ok & representable(s, z)
        q = codes_of(xg, np.where(ok, s, 1)[:, None].astype(np.float32),
                     np.where(ok, z, 0)[:, None].astype(np.float32), levels)
        e = _err(xg, vg, wg, q, np.where(ok, s, 1).astype(np.float32),
                 np.where(ok, z, 0).astype(np.float32), levels)
        take = ok & (e < best_e)
        best_s[take], best_z[take], best_e[take] = s[take], z[take], e[take]

    with np.errstate(all="ignore"):
        for f in GRID_CLIPS:
            f32 = np.float32(f)
            lo_c = (lo * f32).astype(np.float32)
            hi_c = (hi * f32).astype(np.float32)
            s = np.where(const, np.float32(1), ((hi_c - lo_c) / Q).astype(np.float32))
            s, z = _round(s, lambda s_: np.where(const, -lo, -lo_c / s_), f16)
            consider(s, z, np.ones(len(xg), bool))
        L64 = levels.astype(np.float64)
        for _ in range(GRID_REFITS):
            found = np.isfinite(best_e)
            q = codes_of(xg, np.where(found, best_s, 1)[:, None], np.where(found, best_z, 0)[:, None],
                         levels)
            w = wg.astype(np.float64)
            lq = L64[q]
            x = xg.astype(np.float64)

            def seq(a):
                return np.cumsum(a, axis=1)[:, -1]

            sw, sl, sll = seq(w), seq(w * lq), seq(w * lq * lq)
            sx, slx = seq(w * x), seq(w * lq * x)
            det = sw * sll - sl * sl
            a = (sw * slx - sl * sx) / det
            c = (sll * sx - sl * slx) / det
            ok = found & (det > 0) & np.isfinite(a) & np.isfinite(c) & (a > 0)
            s = np.where(ok, a, 1).astype(np.float32)
            s, z = _round(s, lambda s_: (-c / s_.astype(np.float64)), f16)
            consider(s, z, ok)
    if not np.all(np.isfinite(best_e)):
        raise ValidationError("grid parameters not representable; use float32 parameters")
    return best_s, best_z


def learn_levels(xg, vg, wg, bits: int, start: np.ndarray) -> np.ndarray:
    """The importance-weighted Lloyd table (FORMAT.md 10.4, learned grid):
    normalized values u under each group's float32 parameters searched on
    the starting table (10.4), LLOYD_ITERS rounds of nearest-level assignment
    and weighted means of the interior levels (float64, element order), end
    points pinned; a round whose table is not strictly increasing is not
    taken. Constant groups and zero weights are left out."""
    Q = (1 << bits) - 1
    big = np.float32(np.inf)
    lo = np.where(vg, xg, big).min(axis=1).astype(np.float32)
    hi = np.where(vg, xg, -big).max(axis=1).astype(np.float32)
    const = ~(hi > lo)
    s, z = search_params(xg, vg, wg, start.astype(np.float32), bits, False)
    with np.errstate(all="ignore"):
        inv = (np.float32(1) / s).astype(np.float32)
        u = ((xg * inv[:, None]).astype(np.float32) + z[:, None]).astype(np.float32)
    keep = vg.reshape(-1) & (wg.reshape(-1) > 0) & ~np.repeat(const, xg.shape[1])
    u = u.reshape(-1)[keep]
    w = wg.reshape(-1)[keep].astype(np.float64)
    L = start.astype(np.float32).copy()
    for _ in range(LLOYD_ITERS):
        k = np.searchsorted(midpoints(L), u, side="left")
        sw = np.bincount(k, weights=w, minlength=Q + 1)
        su = np.bincount(k, weights=w * u.astype(np.float64), minlength=Q + 1)
        new = L.copy()
        inner = np.arange(1, Q)
        has = sw[inner] > 0
        new[inner[has]] = (su[inner[has]] / sw[inner[has]]).astype(np.float32)
        if not np.all(np.diff(new) > 0):
            break
        L = new
    return L


def superblock_params(xg, vg, wg, levels, bits: int, rows: int, G: int, group_size: int):
    """FORMAT.md 10.5: stage 1 (float32 grid search per group), the float16
    units per super-block, the nearest codes and their fourteen neighbours."""
    s1, z1 = search_params(xg, vg, wg, levels, bits, False)
    K = max(1, 256 // group_size)
    S = -(-G // K)
    P = 15 if bits == 2 else 63
    Pf = np.float32(P)
    s_pad = np.zeros((rows, S * K), np.float32)
    z_pad = np.zeros((rows, S * K), np.float32)
    s_pad[:, :G] = s1.reshape(rows, G)
    z_pad[:, :G] = np.maximum(z1.reshape(rows, G), np.float32(0))
    s_max = s_pad.reshape(rows, S, K).max(axis=2)
    z_max = z_pad.reshape(rows, S, K).max(axis=2)
    with np.errstate(all="ignore"):
        d = round_scale_f16((s_max / Pf).astype(np.float32))
        dz = np.where(z_max > 0, round_scale_f16((z_max / Pf).astype(np.float32)),
                      np.float32(1)).astype(np.float32)
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(dz))):
        raise ValidationError("grid superblock unit not representable in float16; "
                              "use float32 parameters")
    sb = np.arange(G) // K
    D = d[:, sb].reshape(-1)
    DZ = dz[:, sb].reshape(-1)
    a0 = np.clip(np.rint((s1 / D).astype(np.float32)), 1, P).astype(np.int64)
    c0 = np.clip(np.rint((np.maximum(z1, np.float32(0)) / DZ).astype(np.float32)), 0,
                 P).astype(np.int64)

    def err(a, c):
        s = (a.astype(np.float32) * D).astype(np.float32)
        z = (c.astype(np.float32) * DZ).astype(np.float32)
        q = codes_of(xg, s[:, None], z[:, None], levels)
        return _err(xg, vg, wg, q, s, z, levels)

    best_a, best_c = a0.copy(), c0.copy()
    best_e = err(a0, c0)
    for i in (-1, 0, 1):
        for k in (-2, -1, 0, 1, 2):
            if i == 0 and k == 0:
                continue
            a = np.clip(a0 + i, 1, P)
            c = np.clip(c0 + k, 0, P)
            e = err(a, c)
            take = e < best_e
            best_a[take], best_c[take], best_e[take] = a[take], c[take], e[take]
    s = (best_a.astype(np.float32) * D).astype(np.float32)
    z = (best_c.astype(np.float32) * DZ).astype(np.float32)
    units = np.stack([d, dz], axis=2).reshape(-1).astype(np.float32)
    return s, z, units, best_a.astype(np.uint8), best_c.astype(np.uint8)


def quantize_grid(x: np.ndarray, *, bits: int = 4, group_size: int = 64,
                  param_dtype: str = "float16", grid: str = "nl",
                  importance: Optional[np.ndarray] = None,
                  levels: Optional[np.ndarray] = None) -> GridQuant:
    """Quantizes a 2-D float32 array on a code grid (FORMAT.md section 10);
    `levels`: the tensor's table when already chosen."""
    if param_dtype not in ("float32", "float16", "superblock"):
        raise ValidationError(f"a grid takes float32, float16 or superblock parameters, "
                              f"not {param_dtype!r}")
    x2 = np.ascontiguousarray(x, dtype=np.float32)
    if x2.ndim != 2:
        x2 = x2.reshape(x2.shape[0] if x2.ndim else 1, -1)
    rows, cols = x2.shape
    w = None if importance is None else np.asarray(importance, np.float32).reshape(-1)
    xg, vg, wg = _groups(x2, group_size, w)
    if levels is not None:
        pass
    elif grid == "learned":
        start = NL_LEVELS if bits == 4 else np.arange((1 << bits), dtype=np.float32)
        levels = learn_levels(xg, vg, wg, bits, start)
    else:
        levels = fixed_levels(grid, bits)
    levels = check_levels(levels, bits)
    G = -(-cols // group_size)
    extra = {}
    if param_dtype == "superblock":
        s, z, units, a, c = superblock_params(xg, vg, wg, levels, bits, rows, G, group_size)
        extra = dict(units=units, a_codes=a, c_codes=c)
    else:
        s, z = search_params(xg, vg, wg, levels, bits, param_dtype == "float16")
    col_group = np.arange(cols) // group_size
    S = s.reshape(rows, G)[:, col_group]
    Z = z.reshape(rows, G)[:, col_group]
    q = codes_of(x2, S, Z, levels)
    return GridQuant(codes=q, scales=s, zero_points=z, levels=levels, bits=bits,
                     group_size=group_size, param_dtype=param_dtype, **extra)
