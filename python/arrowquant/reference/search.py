"""The `mse` parameter search (docs/FORMAT.md, "Method mse") in numpy.

Bit-exact twin of cpp/src/kernels/param_search.cc: the same candidates in the
same order, the same float32 element operations, the same float64 refit and
the same summation order, so that engine and reference choose identical
parameters. Every group of a tensor is evaluated at once per candidate (a
group whose candidate chain has stopped is masked out), so there is no Python
loop per group.

Summation order (shared with the engine): element i of a group adds into
float32 lane i % 8, sequentially in i, starting from +0; the eight lanes are
combined as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)). Code sums are exact
integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..errors import ValidationError

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

#: Clip fractions of the candidate ranges, per bit width (float32 values,
#: identical to kMseClips in cpp/src/kernels/param_search.h).
CLIPS: Dict[int, Tuple[float, ...]] = {
    2: (0.8, 0.6),
    4: (0.9, 0.8),
    8: (),
}
#: Least-squares refits after each starting candidate, and then after the
#: best candidate found so far.
START_REFITS = 0
FINAL_REFITS = 3
#: Extra starts when the search feeds a super-block (param_dtype superblock,
#: stage 1): ranges c * (hi - lo) anchored at the minimum, then at the
#: maximum, for each c (kSuperblockAnchorClips in param_search.h).
ANCHOR_CLIPS: Tuple[float, ...] = (0.95, 0.85)


def _clips(bits: int) -> np.ndarray:
    return np.array(CLIPS[bits], dtype=np.float32)


def round_scale_f16(s: np.ndarray) -> np.ndarray:
    """float16 storage of positive scales: round to nearest even; a scale that
    would round to 0 becomes the smallest float16 subnormal 2^-24."""
    with np.errstate(all="ignore"):
        r = s.astype(np.float16).astype(np.float32)
    return np.where((r == _F0) & (s > _F0), np.float32(2.0**-24), r).astype(np.float32)


def round_f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return v.astype(np.float16).astype(np.float32)


def representable(s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Parameters the code formula can use: 0 < scale, finite 1/scale, finite zero."""
    with np.errstate(all="ignore"):
        return (s > _F0) & np.isfinite(s) & np.isfinite(_F1 / s) & np.isfinite(z)


def _reduce8(acc: np.ndarray) -> np.ndarray:
    a = acc[:, :4] + acc[:, 4:]          # (l0+l4, l1+l5, l2+l6, l3+l7)
    b = a[:, :2] + a[:, 2:]              # ((l0+l4)+(l2+l6), (l1+l5)+(l3+l7))
    return (b[:, 0] + b[:, 1]).astype(np.float32)


@dataclass
class _Groups:
    """All groups of a tensor as rows of a (N, P) float32 matrix, P = group
    size rounded up to a multiple of 8, with the padding masked out."""

    x: np.ndarray      # (N, P) float32, padding 0
    valid: np.ndarray  # (N, P) bool
    n: np.ndarray      # (N,) elements per group
    rows: int
    groups: int

    def lane_sum(self, v: np.ndarray) -> np.ndarray:
        """Per-group float32 sum of v (N, P) in the engine's order."""
        v = np.where(self.valid, v, _F0) + _F0  # padding adds +0; -0 -> +0 (as acc + v)
        lanes = v.reshape(v.shape[0], -1, 8)
        acc = np.cumsum(lanes, axis=1, dtype=np.float32)[:, -1, :]  # sequential per lane
        return _reduce8(acc)

    def int_sum(self, v: np.ndarray) -> np.ndarray:
        return np.where(self.valid, v, _F0).astype(np.int64).sum(axis=1)


def _groups(x2: np.ndarray, g: int) -> _Groups:
    rows, cols = x2.shape
    G = -(-cols // g)
    P = -(-g // 8) * 8
    x = np.zeros((rows, G * g), dtype=np.float32)
    x[:, :cols] = x2
    x = x.reshape(rows, G, g)
    if P != g:
        x = np.concatenate([x, np.zeros((rows, G, P - g), dtype=np.float32)], axis=2)
    pos = np.arange(P)[None, :]
    n_per = np.minimum(g, cols - np.arange(G) * g)  # (G,)
    valid = np.broadcast_to(pos < n_per[:, None], (G, P))
    valid = np.broadcast_to(valid[None], (rows, G, P)).reshape(rows * G, P)
    n = np.broadcast_to(n_per[None], (rows, G)).reshape(-1)
    return _Groups(x=x.reshape(rows * G, P), valid=valid, n=n, rows=rows, groups=G)


class _Search:
    """State of the search for every group: the best candidate so far."""

    def __init__(self, grp: _Groups, bits: int, symmetric: bool, f16: bool):
        self.grp = grp
        self.bits = bits
        self.q_max = np.float32(2**bits - 1)
        self.symmetric = symmetric
        self.z_sym = np.float32(2 ** (bits - 1))
        self.f16 = f16
        N = grp.x.shape[0]
        self.best_s = np.ones(N, dtype=np.float32)
        self.best_z = np.zeros(N, dtype=np.float32)
        self.best_e = np.full(N, np.inf, dtype=np.float32)
        self.has_best = np.zeros(N, dtype=bool)
        self.best_sums: Tuple[np.ndarray, ...] = ()

    def store(self, s: np.ndarray, z: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Storage precision: (scale, zero, representable)."""
        if self.f16:
            s = round_scale_f16(s)
            z = self.z_sym_like(s) if self.symmetric else round_f16(z)
        return s, z, representable(s, z)

    def z_sym_like(self, s: np.ndarray) -> np.ndarray:
        return np.full_like(s, self.z_sym)

    def evaluate(self, s: np.ndarray, z: np.ndarray, active: np.ndarray, mid: np.ndarray):
        """True error of (s, z) with the FORMAT.md formulas, and the sums the
        refit needs (codes recomputed with these parameters). Updates the
        best candidate where active and strictly better (ties keep the older)."""
        x = self.grp.x
        s_ = np.where(active, s, _F1).astype(np.float32)
        z_ = np.where(active, z, self.z_sym if self.symmetric else _F0).astype(np.float32)
        with np.errstate(all="ignore"):
            inv = (_F1 / s_)[:, None]
            if self.symmetric:
                q = np.clip(np.rint(x * inv) + self.z_sym, _F0, self.q_max)
                k = q - self.z_sym
                e = x - k * s_[:, None]
                sxk = self.grp.lane_sum(x * k)
                skk = self.grp.int_sum(k * k)
                sums = (skk, sxk)
            else:
                q = np.clip(np.rint(x * inv + z_[:, None]), _F0, self.q_max)
                e = x - (q - z_[:, None]) * s_[:, None]
                sl = self.grp.int_sum(q)
                sll = self.grp.int_sum(q * q)
                sxl = self.grp.lane_sum((x - mid[:, None]) * q)
                sums = (sl, sll, sxl)
            err = self.grp.lane_sum(e * e)
        better = active & (~self.has_best | (err < self.best_e))
        self.best_s = np.where(better, s_, self.best_s)
        self.best_z = np.where(better, z_, self.best_z)
        self.best_e = np.where(better, err, self.best_e)
        self.has_best |= better
        if not self.best_sums:
            self.best_sums = tuple(np.array(v) for v in sums)
        else:
            self.best_sums = tuple(np.where(better, v, b)
                                   for v, b in zip(sums, self.best_sums))
        return sums

    def refit(self, sums, sx: np.ndarray, mid: np.ndarray, active: np.ndarray):
        """Least-squares scale and offset for the codes of the last evaluation
        (float64), then stored precision. Returns (s, z, still active)."""
        with np.errstate(all="ignore"):
            if self.symmetric:
                skk, sxk = sums
                dkk = skk.astype(np.float64)
                ok = active & (skk > 0)
                s = np.where(ok, sxk.astype(np.float64) / np.where(ok, dkk, 1.0), 1.0)
                s32 = s.astype(np.float32)
                ok &= (s32 > _F0) & np.isfinite(s32)
                s32, z32, rep = self.store(np.where(ok, s32, _F1), self.z_sym_like(s32))
                return s32, z32, ok & rep
            sl, sll, sxl = sums
            dn = self.grp.n.astype(np.float64)
            dsl = sl.astype(np.float64)
            det = dn * sll.astype(np.float64) - dsl * dsl
            ok = active & (det > 0.0)
            det_ = np.where(ok, det, 1.0)
            dsx = sx.astype(np.float64)
            s = (dn * sxl.astype(np.float64) - dsx * dsl) / det_
            m = (dsx - s * dsl) / dn
            s32 = s.astype(np.float32)
            ok &= (s32 > _F0) & np.isfinite(s32)
            s32 = np.where(ok, s32, _F1).astype(np.float32)
            if self.f16:
                s32 = round_scale_f16(s32)
            z = (-(m + mid.astype(np.float64)) / s32.astype(np.float64)).astype(np.float32)
            s32, z32, rep = self.store(s32, z)
            return s32, z32, ok & rep


def _rtn_storage(s_rtn: np.ndarray, z_rtn: np.ndarray, lo: np.ndarray,
                 symmetric: bool) -> Tuple[np.ndarray, np.ndarray]:
    """rtn parameters at float16 precision: the scale rounded, the asymmetric
    zero point re-derived from the rounded scale (-lo / scale; also right for
    a constant group, whose scale is 1) and rounded."""
    s16 = round_scale_f16(s_rtn)
    if symmetric:
        return s16, z_rtn
    with np.errstate(all="ignore"):
        z = (-lo / s16).astype(np.float32)
    return s16, round_f16(z)


def _stats(grp: _Groups, symmetric: bool):
    """lo, hi (asymmetric) or max |x| (symmetric) per group, as the engine."""
    x = grp.x
    if symmetric:
        a = np.where(grp.valid, np.abs(x), _F0).max(axis=1)
        return a, a
    lo = np.where(grp.valid, x, np.inf).min(axis=1).astype(np.float32) + _F0
    hi = np.where(grp.valid, x, -np.inf).max(axis=1).astype(np.float32) + _F0
    return lo, hi


def search_params(x2: np.ndarray, bits: int, group_size: int, scheme: str, method: str,
                  param_dtype: str, s_rtn: np.ndarray, z_rtn: np.ndarray,
                  name: str = "tensor", anchored: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(R, G) scale and zero point for method rtn at float16 or method mse.

    s_rtn / z_rtn are the FORMAT.md rtn parameters (R, G) at float32.
    `anchored` adds the ANCHOR_CLIPS starts (asymmetric float32 mse only)."""
    rows, cols = x2.shape
    symmetric = scheme == "symmetric"
    f16 = param_dtype == "float16"
    grp = _groups(x2, group_size)
    G = grp.groups
    s0 = s_rtn.reshape(-1).astype(np.float32)
    z0 = z_rtn.reshape(-1).astype(np.float32)
    lo, hi = _stats(grp, symmetric)
    s_msg, z_msg = s0, z0  # float32 rtn, named in error messages
    if f16:
        s0, z0 = _rtn_storage(s0, z0, lo, symmetric)
    rep0 = representable(s0, z0)
    if not symmetric and not rep0.all():
        # rtn's zero point (or scale) is not representable (a zero point beyond
        # float16's range when lo is far from 0 relative to the spread): the
        # range widened to include 0 keeps the zero point in [0, Q].
        lo0 = np.minimum(lo, _F0)
        hi0 = np.maximum(hi, _F0)
        q_max = np.float32(2**bits - 1)
        with np.errstate(all="ignore"):
            sw = ((hi0 - lo0) / q_max).astype(np.float32)
            if f16:
                sw = round_scale_f16(sw)
            zw = (-lo0 / sw).astype(np.float32)
            if f16:
                zw = round_f16(zw)
        repw = representable(sw, zw)
        s0 = np.where(rep0, s0, sw).astype(np.float32)
        z0 = np.where(rep0, z0, zw).astype(np.float32)
        rep0 = rep0 | repw

    def fail(mask: np.ndarray, what: str, rtn: str) -> None:
        i = int(np.argmax(mask))
        r, j = divmod(i, G)
        tail = "; use float32 parameters" if f16 else ""
        raise ValidationError(
            f"tensor {name!r}: row {r}, group {j}: {what} in {param_dtype} "
            f"({rtn}scale {s_msg[i]!r}, zero point {z_msg[i]!r}){tail}"
        )

    if method == "rtn":
        if not rep0.all():
            fail(~rep0, "rtn parameters not representable", "")
        return s0.reshape(rows, G), z0.reshape(rows, G)

    st = _Search(grp, bits, symmetric, f16)
    if symmetric:
        mid = np.zeros_like(lo)
        sx = np.zeros_like(lo)
        base = lo  # max |x|
        m_levels = np.float32(2 ** (bits - 1) - 1)
    else:
        with np.errstate(all="ignore"):
            r = (hi - lo).astype(np.float32)
            mid = (lo + r * np.float32(0.5)).astype(np.float32)
            sx = grp.lane_sum(grp.x - mid[:, None])
        half = np.float32(st.q_max * np.float32(0.5))

    # Starting candidates, in this order: rtn at storage precision (with the
    # widened-range fallback above), then each clipped range. All starts are
    # evaluated, then (START_REFITS times) each is refitted and evaluated,
    # then the best so far is refitted FINAL_REFITS times; the best is
    # updated in that order (ties keep the earlier candidate: rtn wins ties).
    starts = [(s0, z0, rep0)]
    search = _search_mask(lo, hi, symmetric)
    for c in _clips(bits):
        with np.errstate(all="ignore"):
            if symmetric:
                s = (base * c / m_levels).astype(np.float32)
                z = st.z_sym_like(s)
            else:
                s = (r * c / st.q_max).astype(np.float32)
                if f16:
                    s = round_scale_f16(s)
                z = (half - mid / s).astype(np.float32)
        s, z, rep = st.store(s, z)
        starts.append((s, z, search & rep))
    if anchored and not symmetric and not f16:
        for c in np.array(ANCHOR_CLIPS, dtype=np.float32):
            with np.errstate(all="ignore"):
                s = (r * c / st.q_max).astype(np.float32)
                z_lo = (-lo / s).astype(np.float32)
                z_hi = (st.q_max - hi / s).astype(np.float32)
            for z in (z_lo, z_hi):
                s_, z_, rep = st.store(s, z)
                starts.append((s_, z_, search & rep))
    for t in range(START_REFITS + 1):
        all_sums = [st.evaluate(s, z, act, mid) for s, z, act in starts]
        if t == START_REFITS:
            break
        starts = [st.refit(sums, sx, mid, act) for sums, (_, _, act) in zip(all_sums, starts)]
    if st.has_best.any():
        _refits(st, st.best_sums, sx, mid, st.has_best.copy(), FINAL_REFITS)
    if not st.has_best.all():
        fail(~st.has_best, "no candidate parameters representable", "rtn: ")
    return st.best_s.reshape(rows, G), st.best_z.reshape(rows, G)


def _refits(st: _Search, sums, sx, mid, active, count: int) -> None:
    for _ in range(count):
        s, z, active = st.refit(sums, sx, mid, active)
        if not active.any():
            return
        sums = st.evaluate(s, z, active, mid)


def _search_mask(lo: np.ndarray, hi: np.ndarray, symmetric: bool) -> np.ndarray:
    """Groups with a spread to search (others are exact under rtn)."""
    if symmetric:
        return lo > _F0
    return hi > lo
