"""What quantization lost: error sums and metrics (cosine, relative MSE,
SQNR, max error), and the smoothness of group parameters along a row
("Markov" metrics of the first version): how much scale and zero point jump
from one group to the next.

For each row r and adjacent groups j, j+1 (FORMAT.md: parameters row-major,
index r * G + j; groups never span rows, so pairs never cross rows):

- scale jump      = |s[j+1] - s[j]| / max(|s[j]|, |s[j+1]|)   (0 when both are 0)
- zero-point jump = |z[j+1] - z[j]| / (2^bits - 1)              (a fraction of the code range)
                    or, when bits is unknown, |dz| / max(|z[j]|, |z[j+1]|).

Both lie in [0, 1] for positive scales and in-range zero points. A pair is a
violation of a kind when its jump exceeds the threshold; `violations` counts
pairs where either kind does. `get_markov_metrics` is the numpy definition;
`markov_of_params` is what the pipeline calls on each chunk: the same values
(float64 jumps, numpy's pairwise sums) from one C++ pass, with no temporary
arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from ..errors import ValidationError

DEFAULT_THRESHOLD = 0.5


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

    @classmethod
    def of(cls, x: np.ndarray, xhat: np.ndarray) -> "ErrorSums":
        """The sums of original values `x` against reconstructed `xhat` (float64)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        h = np.asarray(xhat, dtype=np.float64).reshape(-1)
        e = x - h
        return cls(sum_x2=float(np.sum(x * x)), sum_xhat2=float(np.sum(h * h)),
                   sum_x_xhat=float(np.sum(x * h)), sum_err2=float(np.sum(e * e)),
                   max_abs_err=float(np.max(np.abs(e))) if e.size else 0.0, count=int(x.size))

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
class MarkovMetrics:
    """Jumps between adjacent groups of a tensor (or of chunks merged)."""

    rows: int
    groups_per_row: int
    pairs: int
    threshold: float
    zero_point_threshold: float
    sum_scale_jump: float
    max_scale_jump: float
    sum_zero_point_jump: float
    max_zero_point_jump: float
    scale_violations: int
    zero_point_violations: int
    violations: int

    @property
    def mean_scale_jump(self) -> float:
        return self.sum_scale_jump / self.pairs if self.pairs else 0.0

    @property
    def mean_zero_point_jump(self) -> float:
        return self.sum_zero_point_jump / self.pairs if self.pairs else 0.0

    @property
    def violation_rate(self) -> float:
        return self.violations / self.pairs if self.pairs else 0.0

    def merge(self, other: "MarkovMetrics") -> None:
        """Adds another chunk of rows of the same tensor."""
        if other.groups_per_row != self.groups_per_row:
            raise ValidationError("cannot merge Markov metrics of different group counts")
        self.rows += other.rows
        self.pairs += other.pairs
        self.sum_scale_jump += other.sum_scale_jump
        self.max_scale_jump = max(self.max_scale_jump, other.max_scale_jump)
        self.sum_zero_point_jump += other.sum_zero_point_jump
        self.max_zero_point_jump = max(self.max_zero_point_jump, other.max_zero_point_jump)
        self.scale_violations += other.scale_violations
        self.zero_point_violations += other.zero_point_violations
        self.violations += other.violations

    def as_dict(self) -> Dict[str, Any]:
        return {
            "pairs": self.pairs,
            "threshold": self.threshold,
            "zero_point_threshold": self.zero_point_threshold,
            "mean_scale_jump": self.mean_scale_jump,
            "max_scale_jump": self.max_scale_jump,
            "mean_zero_point_jump": self.mean_zero_point_jump,
            "max_zero_point_jump": self.max_zero_point_jump,
            "scale_violations": self.scale_violations,
            "zero_point_violations": self.zero_point_violations,
            "violations": self.violations,
            "violation_rate": self.violation_rate,
        }


def _relative_jumps(p: np.ndarray) -> np.ndarray:
    a, b = p[:, :-1], p[:, 1:]
    den = np.maximum(np.abs(a), np.abs(b))
    diff = np.abs(b - a)
    return np.divide(diff, den, out=np.zeros_like(diff), where=den > 0)


def get_markov_metrics(qt_or_params: Any, threshold: float = DEFAULT_THRESHOLD, *,
                       zero_point_threshold: Optional[float] = None,
                       groups_per_row: Optional[int] = None,
                       bits: Optional[int] = None) -> MarkovMetrics:
    """Smoothness metrics of a QuantizedTensor, or of `(scales, zero_points)`.

    Raw parameters are 2-D (rows, G) arrays, or flat arrays with
    `groups_per_row=G`. `bits` (taken from a QuantizedTensor) normalizes
    zero-point jumps by the code range. `zero_point_threshold` defaults to
    `threshold`."""
    if hasattr(qt_or_params, "scales") and hasattr(qt_or_params, "zero_points"):
        scales, zeros = qt_or_params.scales, qt_or_params.zero_points
        if groups_per_row is None:
            groups_per_row = qt_or_params.groups_per_row
        if bits is None:
            bits = getattr(qt_or_params, "bits", None)
    else:
        try:
            scales, zeros = qt_or_params
        except (TypeError, ValueError):
            raise ValidationError(
                "get_markov_metrics expects a QuantizedTensor or (scales, zero_points)") from None
    s = np.asarray(scales, dtype=np.float64)
    z = np.asarray(zeros, dtype=np.float64)
    if s.shape != z.shape:
        raise ValidationError(f"scales {s.shape} and zero points {z.shape} differ in shape")
    if s.ndim == 1:
        if groups_per_row is None:
            raise ValidationError("flat parameters need groups_per_row")
        if groups_per_row <= 0 or s.size % groups_per_row:
            raise ValidationError(
                f"{s.size} parameters are not whole rows of {groups_per_row} groups")
        s = s.reshape(-1, groups_per_row)
        z = z.reshape(-1, groups_per_row)
    elif s.ndim != 2:
        raise ValidationError(f"parameters must be 1-D or 2-D, got shape {s.shape}")
    elif groups_per_row is not None and s.shape[1] != groups_per_row:
        raise ValidationError(f"parameters have {s.shape[1]} groups per row, not {groups_per_row}")
    if threshold < 0:
        raise ValidationError(f"threshold must be >= 0, got {threshold}")
    zthr = threshold if zero_point_threshold is None else float(zero_point_threshold)

    rows, G = s.shape
    sj = _relative_jumps(s)
    if bits is not None:
        zj = np.abs(z[:, 1:] - z[:, :-1]) / float((1 << int(bits)) - 1)
    else:
        zj = _relative_jumps(z)
    s_bad = sj > threshold
    z_bad = zj > zthr
    return MarkovMetrics(
        rows=rows, groups_per_row=G, pairs=int(sj.size), threshold=float(threshold),
        zero_point_threshold=zthr,
        sum_scale_jump=float(sj.sum()), max_scale_jump=float(sj.max()) if sj.size else 0.0,
        sum_zero_point_jump=float(zj.sum()), max_zero_point_jump=float(zj.max()) if zj.size else 0.0,
        scale_violations=int(s_bad.sum()), zero_point_violations=int(z_bad.sum()),
        violations=int((s_bad | z_bad).sum()),
    )


def markov_of_params(scales: np.ndarray, zeros: np.ndarray, groups_per_row: int,
                     bits: Optional[int], threshold: float = DEFAULT_THRESHOLD,
                     zero_point_threshold: Optional[float] = None) -> MarkovMetrics:
    """get_markov_metrics((scales, zeros), threshold, groups_per_row=...,
    bits=...) computed by the engine in one pass (identical results); flat
    float32 parameters, whole rows of `groups_per_row` groups."""
    from . import core

    s = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
    z = np.ascontiguousarray(zeros, dtype=np.float32).reshape(-1)
    if s.size != z.size:
        raise ValidationError(f"{s.size} scales and {z.size} zero points differ in size")
    if groups_per_row <= 0 or s.size % groups_per_row:
        raise ValidationError(f"{s.size} parameters are not whole rows of {groups_per_row} groups")
    if threshold < 0:
        raise ValidationError(f"threshold must be >= 0, got {threshold}")
    zthr = threshold if zero_point_threshold is None else float(zero_point_threshold)
    rows = s.size // groups_per_row
    zero_range = float((1 << int(bits)) - 1) if bits is not None else 0.0
    pairs, ss, ms, sz, mz, sv, zv, v = core.markov_jumps(s, z, rows, groups_per_row, zero_range,
                                                          float(threshold), zthr)
    return MarkovMetrics(
        rows=rows, groups_per_row=groups_per_row, pairs=pairs, threshold=float(threshold),
        zero_point_threshold=zthr, sum_scale_jump=ss, max_scale_jump=ms,
        sum_zero_point_jump=sz, max_zero_point_jump=mz, scale_violations=sv,
        zero_point_violations=zv, violations=v)


__all__ = ["ErrorMetrics", "ErrorSums", "MarkovMetrics", "get_markov_metrics", "markov_of_params",
           "DEFAULT_THRESHOLD"]
