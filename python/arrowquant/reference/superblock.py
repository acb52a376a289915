"""Two-level (superblock) parameters (docs/FORMAT.md section 9) in numpy.

Bit-exact twin of ChooseRowSuperblock in cpp/src/kernels/param_search.cc:
stage 1 chooses each group's float32 parameters (rtn, or the mse search with
the anchored starts), the super-block units follow from their maxima, and
stage 2 (method mse) searches the codes by the true error of each candidate,
in the engine's order. Every group is handled at once per candidate.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import ValidationError
from ..spec import superblock_code_bits, superblock_groups
from .search import _groups, _Search, _stats, round_scale_f16, search_params

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
#: The code search's neighbours of the best: scale code +-1 (outer loop),
#: zero code +-ZERO_CODE_REACH (inner), as kZeroCodeReach in param_search.cc.
ZERO_CODE_REACH = 2


def _clamp(v: np.ndarray, lo: np.float32, hi: np.float32) -> np.ndarray:
    """min(max(v, lo), hi) + 0 (as the engine: a -0 code becomes +0)."""
    return (np.minimum(np.maximum(v, lo), hi) + _F0).astype(np.float32)


def stage_one(x2: np.ndarray, bits: int, group_size: int, method: str, s_rtn: np.ndarray,
              z_rtn: np.ndarray, name: str = "tensor"
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1 per group, flattened (R * G,): float32 (scale, zero point) in
    [0, Q] and whether the range used has a spread (docs/FORMAT.md 9.6)."""
    grp = _groups(x2, group_size)
    q_max = np.float32(2**bits - 1)
    if method == "mse":
        s1, z1 = search_params(x2, bits, group_size, "asymmetric", "mse", "float32", s_rtn, z_rtn,
                               name, anchored=True)
    else:
        s1, z1 = s_rtn, z_rtn
    s1 = s1.reshape(-1).astype(np.float32)
    z1 = z1.reshape(-1).astype(np.float32)
    lo, hi = _stats(grp, False)
    # Zero codes are >= 0 and share a unit: a zero point outside [0, Q] (0
    # outside the codes' range) stretches the range to reach 0, keeping its
    # other end.
    with np.errstate(all="ignore"):
        below = ((q_max - z1) * s1 / q_max).astype(np.float32)
        above = (z1 * s1 / q_max).astype(np.float32)
    s1 = np.where(z1 < _F0, below, np.where(z1 > q_max, above, s1)).astype(np.float32)
    z1 = (np.where(z1 < _F0, _F0, np.where(z1 > q_max, q_max, z1)) + _F0).astype(np.float32)
    spread = hi > lo
    return s1, z1, spread


def superblock_units(s: np.ndarray, z: np.ndarray, spread: np.ndarray, rows: int, groups: int,
                     sb_groups: int, p_max: np.float32
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, dz, largest scale) per super-block (rows, S) from stage-1 (R * G,)
    parameters: d = Rs(max scale of groups with a spread / P), dz = Rs(max
    zero point / P), each 1 when there is none; d may be inf."""
    S = -(-groups // sb_groups)

    def per_block_max(v: np.ndarray) -> np.ndarray:
        padded = np.zeros((rows, S * sb_groups), dtype=np.float32)
        padded[:, :groups] = v.reshape(rows, groups)
        return padded.reshape(rows, S, sb_groups).max(axis=2)

    s_max = per_block_max(np.where(spread, s, _F0))
    z_max = per_block_max(z)
    with np.errstate(all="ignore"):
        d = np.where(s_max > _F0, round_scale_f16((s_max / p_max).astype(np.float32)), _F1)
        dz = np.where(z_max > _F0, round_scale_f16((z_max / p_max).astype(np.float32)), _F1)
    return d.astype(np.float32), dz.astype(np.float32), s_max


def superblock_params(x2: np.ndarray, bits: int, group_size: int, method: str,
                      s_rtn: np.ndarray, z_rtn: np.ndarray, name: str = "tensor"
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scales (R, G), zero points (R, G), scale units (R, S), zero units (R, S)).

    s_rtn / z_rtn are the FORMAT.md rtn parameters (R, G) at float32; the
    returned per-group values are the exact products unit * code."""
    rows, cols = x2.shape
    grp = _groups(x2, group_size)
    G = grp.groups
    K = superblock_groups(group_size)
    S = -(-G // K)
    p_max = np.float32(2 ** superblock_code_bits(bits) - 1)

    s1, z1, spread = stage_one(x2, bits, group_size, method, s_rtn, z_rtn, name)
    lo, hi = _stats(grp, False)
    sb_of = np.arange(G) // K

    def per_group(u: np.ndarray) -> np.ndarray:
        return u[:, sb_of].reshape(-1)

    def nearest(s: np.ndarray, z: np.ndarray, d_g: np.ndarray,
                dz_g: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            a = _clamp(np.rint((s / d_g).astype(np.float32)), _F1, p_max)
            c = _clamp(np.rint((np.maximum(z, _F0) / dz_g).astype(np.float32)), _F0, p_max)
        return a, c

    def units(s: np.ndarray, z: np.ndarray, spread_: np.ndarray):
        return superblock_units(s, z, spread_, rows, G, K, p_max)

    d, dz, s_max = units(s1, z1, spread)
    if not np.isfinite(d).all():
        r, b = np.argwhere(~np.isfinite(d))[0]
        raise ValidationError(
            f"tensor {name!r}: row {r}, group {b * K}: superblock scale unit not representable "
            f"in float16 (largest group scale {float(s_max[r, b])!r}); use float32 parameters")
    d_g, dz_g = per_group(d), per_group(dz)
    a, c = nearest(s1, z1, d_g, dz_g)
    if method != "mse":
        return ((d_g * a).astype(np.float32).reshape(rows, G),
                (dz_g * c).astype(np.float32).reshape(rows, G), d, dz)

    # Stage 2: the code search (strictly better replaces; ties keep the earlier).
    st = _Search(grp, bits, symmetric=False, f16=False)
    with np.errstate(all="ignore"):
        mid = (lo + (hi - lo) * np.float32(0.5)).astype(np.float32)
        sx = grp.lane_sum(grp.x - mid[:, None])
    every = np.ones(a.size, dtype=bool)

    def consider(a_: np.ndarray, c_: np.ndarray, active: np.ndarray) -> None:
        st.evaluate((d_g * a_).astype(np.float32), (dz_g * c_).astype(np.float32), active, mid)

    def requant() -> None:
        s_r, z_r, ok = st.refit(st.best_sums, sx, mid, every)
        consider(*nearest(s_r, z_r, d_g, dz_g), ok)

    consider(a, c, every)
    requant()
    a0 = (st.best_s / d_g).astype(np.float32)
    c0 = (st.best_z / dz_g).astype(np.float32)
    for da in (-1, 0, 1):
        for dc in range(-ZERO_CODE_REACH, ZERO_CODE_REACH + 1):
            if da == 0 and dc == 0:
                continue
            consider(_clamp(a0 + np.float32(da), _F1, p_max),
                     _clamp(c0 + np.float32(dc), _F0, p_max), every)
    requant()

    # The rtn solution of each super-block (its own units, nearest codes)
    # replaces the search's when its total error is strictly smaller.
    s_r, z_r, spread_r = stage_one(x2, bits, group_size, "rtn", s_rtn, z_rtn, name)
    d_r, dz_r, _ = units(s_r, z_r, spread_r)
    d_rg, dz_rg = per_group(d_r), per_group(dz_r)
    a_r, c_r = nearest(s_r, z_r, d_rg, dz_rg)
    st_r = _Search(grp, bits, symmetric=False, f16=False)
    with np.errstate(all="ignore"):
        st_r.evaluate((d_rg * a_r).astype(np.float32), (dz_rg * c_r).astype(np.float32),
                      np.isfinite(d_rg), mid)

    def block_total(e: np.ndarray) -> np.ndarray:
        """float64 sum per super-block, groups added in order from 0."""
        padded = np.zeros((rows, S * K), dtype=np.float64)
        padded[:, :G] = e.reshape(rows, G)
        return np.cumsum(padded.reshape(rows, S, K), axis=2)[:, :, -1]

    use_rtn = np.isfinite(d_r) & (block_total(st_r.best_e) < block_total(st.best_e))
    rtn_g = per_group(use_rtn)
    scales = np.where(rtn_g, d_rg * a_r, st.best_s).astype(np.float32)
    zeros = np.where(rtn_g, dz_rg * c_r, st.best_z).astype(np.float32)
    return (scales.reshape(rows, G), zeros.reshape(rows, G),
            np.where(use_rtn, d_r, d).astype(np.float32),
            np.where(use_rtn, dz_r, dz).astype(np.float32))
