"""Measured sensitivity of a layer: its bounded sample of whole rows
quantized at 2, 4 and 8 bits with the layer's settings, the relative
(importance-weighted) error and cosine at each width, and the first version's
entropy score. Read from the source the run already opened.

Sampling: at most `sample_elements` float32 values (default 2^18 = 1 MiB), in
up to 8 contiguous blocks spread evenly over the rows; whole rows, so groups
are the real groups. `error[b]` is sum((w - w_hat)^2) / sum(w^2) on the
sample, weighted per input channel by `importance` when it is known for the
layer (calibration statistics). `entropy` is the normalized Shannon entropy
of a 256-bin histogram of the sample (0 = one value, 1 = uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from ..config import DiffusionQuantConfig
from ..engine.dtypes import to_float32
from ..engine.finite import check_finite
from ..sources.base import TensorInfo
from .rules import WIDTHS

#: A callable returning a float32 array for a tensor name (2-D view or any shape).
WeightReader = Callable[[str], np.ndarray]
#: (sample float32 2-D, bits, group_size, scheme, method, param_dtype, importance) -> dequantized
Quantizer = Callable[..., np.ndarray]


def entropy_score(x: np.ndarray, bins: int = 256) -> float:
    """Normalized Shannon entropy of a `bins`-bin histogram over [min, max]."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.size == 0:
        return 0.0
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return 0.0
    counts, _ = np.histogram(x, bins=bins, range=(lo, hi))
    p = counts[counts > 0].astype(np.float64) / x.size
    return float(-(p * np.log(p)).sum() / math.log(bins))


@dataclass
class Sensitivity:
    """What quantizing a layer's sample costs at each width."""

    error: Dict[int, float]          # relative (importance-weighted) squared error
    cosine: Dict[int, float]         # plain cosine similarity on the sample
    entropy: float
    sampled_rows: int
    rows: int
    importance_weighted: bool

    def as_dict(self) -> Dict[str, Any]:
        return {"sensitivity": {b: self.error[b] for b in WIDTHS},
                "sample_cosine": {b: self.cosine[b] for b in WIDTHS},
                "entropy": self.entropy, "sampled_rows": self.sampled_rows,
                "rows": self.rows, "importance_weighted": self.importance_weighted}


def _weighted_quantizer() -> Optional[Callable[..., Any]]:
    """arrowquant.importance.quantize_importance_array (the calibration
    component's importance-weighted search) when it is installed."""
    try:
        from ..engine.weighted import quantize_importance_array
    except ImportError:
        return None
    return quantize_importance_array


class SensitivityMeter:
    """Measures layers of one model for a planner (see the module doc).

    importance_for: name -> per-column importance (or None) for a TensorInfo.
    quantizer: optional override of how a sample is quantized (tests, other tools).
    """

    def __init__(self, config: DiffusionQuantConfig, importance_for: Callable[[TensorInfo], Any],
                 quantizer: Optional[Quantizer] = None, sample_elements: int = 1 << 18,
                 weights: Optional[WeightReader] = None) -> None:
        self.config = config
        self._importance_for = importance_for
        self.quantizer = quantizer
        self.sample_elements = int(sample_elements)
        self.weights = weights
        self._reader: Any = None

    def measure_all(self, tensors: Sequence[TensorInfo], reader: Any) -> Dict[str, "Sensitivity"]:
        """Sensitivity of each tensor, reading samples through `reader` (a
        ModelSource) unless the meter has a weights callable."""
        self._reader = reader
        try:
            return {t.name: self._measure(t) for t in tensors}
        finally:
            self._reader = None


    def _sample(self, t: TensorInfo) -> np.ndarray:
        """A float32 (k, cols) sample of whole rows, at most sample_elements values
        (but at least one row), in up to 8 contiguous blocks spread evenly."""
        rows, cols = t.rows, t.cols
        k = max(1, min(rows, self.sample_elements // max(cols, 1)))
        nblocks = min(8, k)
        per = k // nblocks
        if k == rows:
            starts = [0]
            counts = [rows]
        else:
            starts = [int(round(i * (rows - per) / max(nblocks - 1, 1))) for i in range(nblocks)]
            counts = [per] * nblocks
        if self.weights is not None:
            full = np.asarray(self.weights(t.name), dtype=np.float32).reshape(rows, cols)
            parts = [full[s:s + c] for s, c in zip(starts, counts)]
        else:
            parts = []
            for s, c in zip(starts, counts):
                raw = np.asarray(self._reader.read(t.name, s, c)).reshape(-1).view(np.uint8)
                parts.append(to_float32(raw, t.dtype).reshape(c, cols))
        location = getattr(self._reader, "location", None)
        for start, part in zip(starts, parts):
            check_finite(part, name=t.name, cols=cols, first_row=start,
                         location=location(t.name) if location else None)
        return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)

    def _quantize_sample(self, sample: np.ndarray, bits: int, importance: Optional[np.ndarray],
                         name: str) -> np.ndarray:
        cfg = self.config
        spec = cfg.spec_for(bits)
        if self.quantizer is not None:
            return np.asarray(self.quantizer(
                sample, bits=bits, group_size=spec.group_size, scheme=cfg.scheme,
                method=spec.method, param_dtype=spec.param_dtype, importance=importance),
                dtype=np.float32).reshape(sample.shape)
        from ..engine import dequantize_array, quantize_array

        if importance is not None and spec.param_dtype != "superblock":
            # (The weighted search has no two-level parameters: a superblock
            # layer is measured with the plain method and a weighted error.)
            weighted = _weighted_quantizer()
            if weighted is not None:
                # What the calibrated pipeline will do with this layer.
                qt = weighted(sample, importance, bits=bits, group_size=spec.group_size,
                              scheme=cfg.scheme, param_dtype=spec.param_dtype, name=name,
                              threads=cfg.num_threads)
                return dequantize_array(qt, threads=cfg.num_threads)

        qt = quantize_array(sample, bits=bits, group_size=spec.group_size, scheme=cfg.scheme,
                            method=spec.method, param_dtype=spec.param_dtype, name=name,
                            threads=cfg.num_threads)
        return dequantize_array(qt, threads=cfg.num_threads)

    def _measure(self, t: TensorInfo) -> Sensitivity:
        sample = self._sample(t)
        imp = self._importance_for(t)
        if imp is None and self.quantizer is None:
            # Unweighted: the engine's own error sums give both numbers
            # without dequantizing the sample.
            from ..engine import quantize_array

            cfg = self.config
            err, cos = {}, {}
            for b in WIDTHS:
                spec = cfg.spec_for(b)
                m = quantize_array(sample, bits=b, group_size=spec.group_size, scheme=cfg.scheme,
                                   method=spec.method, param_dtype=spec.param_dtype, name=t.name,
                                   threads=cfg.num_threads).metrics
                err[b], cos[b] = m.rel_mse, m.cosine
            return Sensitivity(error=err, cosine=cos, entropy=entropy_score(sample),
                               sampled_rows=sample.shape[0], rows=t.rows, importance_weighted=False)
        x = sample.astype(np.float64)
        x2 = x * x
        denom = float((x2 * imp).sum()) if imp is not None else float(x2.sum())
        norm_x = math.sqrt(float(x2.sum()))
        err: Dict[int, float] = {}
        cos: Dict[int, float] = {}
        for b in WIDTHS:
            xh = self._quantize_sample(sample, b, imp, t.name).astype(np.float64)
            d2 = (x - xh) ** 2
            num = float((d2 * imp).sum()) if imp is not None else float(d2.sum())
            err[b] = num / denom if denom > 0 else (0.0 if num == 0 else math.inf)
            norm_h = math.sqrt(float((xh * xh).sum()))
            if norm_x > 0 and norm_h > 0:
                cos[b] = float((x * xh).sum()) / (norm_x * norm_h)
            else:
                cos[b] = 1.0 if norm_x == norm_h else 0.0
        return Sensitivity(error=err, cosine=cos, entropy=entropy_score(sample),
                           sampled_rows=sample.shape[0], rows=t.rows,
                           importance_weighted=imp is not None)
