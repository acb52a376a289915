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

from .errors import ValidationError
from .reference_search import _groups, _Search, _stats, round_scale_f16, search_params
from .tensor import superblock_code_bits, superblock_groups

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
#: The code search's neighbours of the best: scale code +-1 (outer loop),
#: zero code +-ZERO_CODE_REACH (inner), as kZeroCodeReach in param_search.cc.
ZERO_CODE_REACH = 2


def _clamp(v: np.ndarray, lo: np.float32, hi: np.float32) -> np.ndarray:
    """min(max(v, lo), hi) + 0 (as the engine: a -0 code becomes +0)."""
    return (np.minimum(np.maximum(v, lo), hi) + _F0).astype(np.float32)


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
    q_max = np.float32(2**bits - 1)
    p_max = np.float32(2 ** superblock_code_bits(bits) - 1)
    z_cap = np.float32(65504.0) * p_max

    # Stage 1: float32 parameters per group.
    if method == "mse":
        s1, z1 = search_params(x2, bits, group_size, "asymmetric", "mse", "float32", s_rtn, z_rtn,
                               name, anchored=True)
    else:
        s1, z1 = s_rtn, z_rtn
    s1 = s1.reshape(-1).astype(np.float32)
    z1 = _clamp(z1.reshape(-1).astype(np.float32), _F0, z_cap)
    lo, hi = _stats(grp, False)

    # Units per super-block (a row's groups K at a time; padding contributes 0).
    def per_block_max(v: np.ndarray) -> np.ndarray:
        padded = np.zeros((rows, S * K), dtype=np.float32)
        padded[:, :G] = v.reshape(rows, G)
        return padded.reshape(rows, S, K).max(axis=2)

    s_max = per_block_max(np.where(hi > lo, s1, _F0))
    z_max = per_block_max(z1)
    with np.errstate(all="ignore"):
        d = np.where(s_max > _F0, round_scale_f16((s_max / p_max).astype(np.float32)), _F1)
        dz = np.where(z_max > _F0, round_scale_f16((z_max / p_max).astype(np.float32)), _F1)
    d = d.astype(np.float32)
    dz = dz.astype(np.float32)
    if not np.isfinite(d).all():
        r, b = np.argwhere(~np.isfinite(d))[0]
        raise ValidationError(
            f"tensor {name!r}: row {r}, group {b * K}: superblock scale unit not representable "
            f"in float16 (largest group scale {float(s_max[r, b])!r}); use float32 parameters")
    sb_of = np.arange(G) // K
    d_g = d[:, sb_of].reshape(-1)
    dz_g = dz[:, sb_of].reshape(-1)

    def nearest(s: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            a = _clamp(np.rint((s / d_g).astype(np.float32)), _F1, p_max)
            c = _clamp(np.rint((np.maximum(z, _F0) / dz_g).astype(np.float32)), _F0, p_max)
        return a, c

    a, c = nearest(s1, z1)
    if method == "mse":
        # Stage 2: the code search (strictly better replaces; ties keep the earlier).
        st = _Search(grp, bits, symmetric=False, f16=False)
        with np.errstate(all="ignore"):
            mid = (lo + (hi - lo) * np.float32(0.5)).astype(np.float32)
            sx = grp.lane_sum(grp.x - mid[:, None])
        every = np.ones(a.size, dtype=bool)

        def consider(a_: np.ndarray, c_: np.ndarray, active: np.ndarray) -> None:
            st.evaluate((d_g * a_).astype(np.float32), (dz_g * c_).astype(np.float32), active,
                        mid)

        def requant() -> None:
            s_r, z_r, ok = st.refit(st.best_sums, sx, mid, every)
            consider(*nearest(s_r, z_r), ok)

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
        scales, zeros = st.best_s, st.best_z
    else:
        scales = (d_g * a).astype(np.float32)
        zeros = (dz_g * c).astype(np.float32)
    return (scales.reshape(rows, G), zeros.reshape(rows, G), d, dz)
