"""Importance-weighted quantization and channel equalization (AWQ / SmoothQuant
style) driven by calibration statistics.

Two pieces, both on the C++ engine:

- Importance-weighted parameters (`method="importance"`): every group's scale
  and zero point minimize sum_c w_c (x_c - x_hat_c)^2, with w the per-input-
  channel importance (E[x_c^2] from calibration), instead of plain min/max
  (cpp/src/importance.cc; never worse than rtn in that error, group by group).
- Channel equalization: per-input-channel scales s. The stored weight is
  W'[:, c] = W[:, c] * s[c], quantized with importance w_c / s_c^2 (the error
  of W' divided by s is the error of W); readers recover W_hat[:, c] =
  W'_hat[:, c] / s[c] (FORMAT.md spatial_quant_json). Channels with large
  activations get larger s, hence finer effective steps, where they matter.

      s_c = a_c^alpha / m_c^(1 - alpha),   normalized to geometric mean 1

  with a_c the activation absmax (calibration) and m_c the weight absmax of
  input channel c over ALL rows of the tensor. alpha is searched per layer on
  a grid (plus s = 1, so equalization is only used when it helps) to
  minimize the output-error proxy sum_c E[x_c^2] ||W[:, c] - W_hat[:, c]||^2,
  which is E||x W^T - x W_hat^T||^2 when input channels are uncorrelated.

Chunked tensors: the pipeline quantizes a large tensor in row chunks, and the
column scales must be identical for every chunk. `plan_equalization` makes
them once per tensor: a first pass over the row chunks gathers the
per-column weight absmax (exact, over all rows) and an evenly spaced sample of
rows (all rows when there are at most `max_sample_rows`); alpha is searched on
that sample. Every chunk is then quantized with `equalization=<the scales>`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ValidationError
from ..spec import check_spec, groups_per_row, packed_row_bytes, view_2d
from . import core, dequantize_array
from .dtypes import QUANTIZABLE_DTYPES, to_float32
from .finite import check_finite
from .metrics import ErrorSums
from .tensor import QuantizedTensor, as_source

#: alpha values tried by the equalization search (s = 1 is always tried too).
DEFAULT_ALPHAS: Tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
#: rows of a tensor on which alpha is searched (evenly spaced; all when fewer).
DEFAULT_MAX_SAMPLE_ROWS = 256
#: equalization scales are kept within [1/LIMIT, LIMIT] after normalization.
SCALE_LIMIT = 1.0e4
#: a channel's activation / weight magnitude is floored at this fraction of
#: the largest one, so that a dead channel never gets a zero or infinite scale.
MAGNITUDE_FLOOR = 1.0e-5

METHOD = "importance"


@dataclass
class SearchOptions:
    """Candidate grid of the C++ search (see cpp/include/arrowquant/importance.h)."""

    grid_steps: int = 10
    max_clip: float = 0.5
    refit_iters: int = 3
    refit_all: bool = True


#: The cheaper search used to rank alpha candidates (rtn + weighted refits,
#: no clipping grid): every candidate is ranked with the same quantizer, and
#: the final quantization uses the full search.
RANKING_OPTIONS = SearchOptions(grid_steps=0, refit_iters=2, refit_all=False)


@dataclass
class EqualizationPlan:
    """Column scales for one tensor (None: equalization did not help)."""

    scales: Optional[np.ndarray]          # float32, length cols
    alpha: Optional[float]
    proxy_errors: Dict[str, float] = field(default_factory=dict)
    sample_rows: int = 0

    def spatial_json(self) -> Optional[str]:
        return spatial_quant_json(self.scales, self.alpha, self.proxy_errors)


# --------------------------------------------------------------------------
# importance-weighted parameters (engine)


def per_column(values: Optional[np.ndarray], cols: int, what: str, name: str) -> Optional[np.ndarray]:
    """A per-input-channel vector expanded to the cols of the 2-D view: a
    Conv weight [out, in, kh, kw] has cols = in * kh * kw, and column c
    belongs to input channel c // (kh * kw)."""
    if values is None:
        return None
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == cols:
        return np.ascontiguousarray(v)
    if v.size == 0 or cols % v.size:
        raise ValidationError(
            f"tensor {name!r}: {what} has {v.size} entries, which neither equals nor divides the "
            f"{cols} columns of the weight"
        )
    return np.repeat(v, cols // v.size)


def quantize_importance_array(array: Any, importance: Optional[np.ndarray], *, bits: int = 4,
                              group_size: int = 128, scheme: str = "asymmetric",
                              param_dtype: str = "float32", dtype: Optional[str] = None,
                              shape: Optional[Sequence[int]] = None, name: str = "tensor",
                              threads: int = 0, options: Optional[SearchOptions] = None,
                              force_scalar: bool = False, row_offset: int = 0) -> QuantizedTensor:
    """Quantizes with importance-weighted parameters (no equalization).
    `importance` is per column or per input channel; None weighs every
    column equally (a plain error-minimizing search)."""
    check_spec(bits, group_size, scheme, "rtn", param_dtype)
    o = options or SearchOptions()
    src = as_source(array, dtype=dtype, shape=shape, name=name)
    rows, cols = src.rows, src.cols
    w = per_column(importance, cols, "importance", name)
    if w is None:
        w = np.ones(cols, dtype=np.float32)
    G = groups_per_row(cols, group_size)
    packed = np.empty(rows * packed_row_bytes(cols, bits), dtype=np.uint8)
    scales = np.empty(rows * G, dtype=np.float32)
    zero_points = np.empty(rows * G, dtype=np.float32)
    sums = core.call(name, core.quantize_importance, src.raw, src.dtype, rows, cols, bits, group_size,
                 scheme, param_dtype, w, packed, scales, zero_points, o.grid_steps,
                 float(o.max_clip), o.refit_iters, o.refit_all, threads, force_scalar,
                 row_offset)
    return QuantizedTensor(
        data=packed, scales=scales, zero_points=zero_points, shape=src.shape, dtype=src.dtype,
        bits=bits, group_size=group_size, scheme=scheme, method=METHOD, param_dtype=param_dtype,
        name=name, error=ErrorSums(*sums),
    )


# --------------------------------------------------------------------------
# equalization


def equalization_scales(weight_absmax_per_col: np.ndarray, act_absmax: np.ndarray, alpha: float,
                        *, cols: Optional[int] = None) -> np.ndarray:
    """s (float32, length cols) = a^alpha / m^(1-alpha) per input channel,
    normalized to geometric mean 1 and clipped to [1/SCALE_LIMIT, SCALE_LIMIT].

    `weight_absmax_per_col` has one entry per column of the 2-D view (over
    all rows); `act_absmax` one per input channel (or per column). For a Conv
    the weight magnitude of a channel is the max over its kh*kw columns, so
    one scale covers the whole channel."""
    wmax = np.abs(np.asarray(weight_absmax_per_col, dtype=np.float64).reshape(-1))
    ncols = wmax.size if cols is None else int(cols)
    act = np.abs(np.asarray(act_absmax, dtype=np.float64).reshape(-1))
    if act.size == 0 or ncols % act.size:
        raise ValidationError(f"activation absmax has {act.size} entries for {ncols} columns")
    per = ncols // act.size
    wch = wmax.reshape(act.size, per).max(axis=1)
    act = np.maximum(act, MAGNITUDE_FLOOR * max(float(act.max()), 1e-30))
    wch = np.maximum(wch, MAGNITUDE_FLOOR * max(float(wch.max()), 1e-30))
    log_s = alpha * np.log(act) - (1.0 - alpha) * np.log(wch)
    log_s -= log_s.mean()
    s = np.clip(np.exp(log_s), 1.0 / SCALE_LIMIT, SCALE_LIMIT).astype(np.float32)
    return np.repeat(s, per)


def _apply_scales(x2: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x2 * s[None, :], dtype=np.float32)


def _proxy_error(w2: np.ndarray, what: np.ndarray, msq: np.ndarray) -> float:
    d = w2.astype(np.float64) - what.astype(np.float64)
    return float(np.sum(msq.astype(np.float64) * np.sum(d * d, axis=0)))


def search_equalization(sample: np.ndarray, weight_absmax_per_col: np.ndarray,
                        importance: np.ndarray, act_absmax: np.ndarray, *, bits: int,
                        group_size: int, scheme: str = "asymmetric",
                        param_dtype: str = "float32", alphas: Sequence[float] = DEFAULT_ALPHAS,
                        threads: int = 0, options: Optional[SearchOptions] = None,
                        name: str = "tensor", sample_rows_total: Optional[int] = None
                        ) -> EqualizationPlan:
    """Chooses alpha on `sample` (rows x cols float32) by the proxy
    sum_c E[x_c^2] ||W[:, c] - W_hat[:, c]||^2, with `importance` (per
    column) standing for E[x_c^2]. s = 1 is the first candidate and is kept
    unless an alpha is strictly better. Candidates are quantized with
    `options` (default RANKING_OPTIONS, the same for every candidate)."""
    options = options or RANKING_OPTIONS
    x2 = np.ascontiguousarray(sample, dtype=np.float32)
    rows, cols = x2.shape
    msq = per_column(importance, cols, "importance", name)
    if msq is None:
        raise ValidationError(f"tensor {name!r}: equalization needs activation statistics")

    def evaluate(s: Optional[np.ndarray]) -> float:
        if s is None:
            qt = quantize_importance_array(x2, msq, bits=bits, group_size=group_size, scheme=scheme,
                                           param_dtype=param_dtype, name=name, threads=threads,
                                           options=options)
            return _proxy_error(x2, dequantize_array(qt, threads=threads).reshape(rows, cols), msq)
        ws = _apply_scales(x2, s)
        qt = quantize_importance_array(ws, msq / (s * s), bits=bits, group_size=group_size,
                                       scheme=scheme, param_dtype=param_dtype, name=name,
                                       threads=threads, options=options)
        what = dequantize_array(qt, threads=threads).reshape(rows, cols) / s[None, :]
        return _proxy_error(x2, what, msq)

    errors: Dict[str, float] = {"none": evaluate(None)}
    best_alpha: Optional[float] = None
    best_s: Optional[np.ndarray] = None
    best = errors["none"]
    for alpha in alphas:
        s = equalization_scales(weight_absmax_per_col, act_absmax, float(alpha), cols=cols)
        e = evaluate(s)
        errors[f"{float(alpha):g}"] = e
        if e < best:
            best, best_alpha, best_s = e, float(alpha), s
    return EqualizationPlan(scales=best_s, alpha=best_alpha, proxy_errors=errors,
                            sample_rows=sample_rows_total if sample_rows_total is not None else rows)


def sample_row_indices(rows: int, max_rows: int = DEFAULT_MAX_SAMPLE_ROWS) -> np.ndarray:
    """Evenly spaced, deterministic row indices (all rows when rows <= max_rows)."""
    if rows <= max_rows:
        return np.arange(rows, dtype=np.int64)
    return np.unique(np.linspace(0, rows - 1, max_rows).round().astype(np.int64))


def plan_equalization(read_rows: Callable[[int, int], np.ndarray], rows: int, cols: int,
                      importance: np.ndarray, act_absmax: np.ndarray, *, bits: int,
                      group_size: int, scheme: str = "asymmetric", param_dtype: str = "float32",
                      chunk_rows: int = 4096, max_sample_rows: int = DEFAULT_MAX_SAMPLE_ROWS,
                      alphas: Sequence[float] = DEFAULT_ALPHAS, threads: int = 0,
                      options: Optional[SearchOptions] = None, name: str = "tensor"
                      ) -> EqualizationPlan:
    """Column scales of a whole tensor, computed once for all its chunks.

    `read_rows(row_start, row_count)` returns those rows of the 2-D view as a
    float32 (row_count, cols) array (the pipeline converts from the source
    dtype). Pass 1 reads the tensor chunk by chunk (memory: one chunk plus the
    sample), gathering the per-column absmax over all rows and the sample
    rows; then alpha is searched on the sample (candidates quantized with
    `options`, default RANKING_OPTIONS)."""
    idx = sample_row_indices(rows, max_sample_rows)
    sample = np.empty((idx.size, cols), dtype=np.float32)
    wmax = np.zeros(cols, dtype=np.float32)
    chunk_rows = max(1, int(chunk_rows))
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        block = np.asarray(read_rows(r0, n), dtype=np.float32).reshape(n, cols)
        check_finite(block, name=name, cols=cols, first_row=r0)
        np.maximum(wmax, np.max(np.abs(block), axis=0), out=wmax)
        lo, hi = np.searchsorted(idx, [r0, r0 + n])
        if hi > lo:
            sample[lo:hi] = block[idx[lo:hi] - r0]
    return search_equalization(sample, wmax, importance, act_absmax, bits=bits,
                               group_size=group_size, scheme=scheme, param_dtype=param_dtype,
                               alphas=alphas, threads=threads, options=options, name=name,
                               sample_rows_total=int(idx.size))


def spatial_quant_json(scales: Optional[np.ndarray], alpha: Optional[float] = None,
                       proxy_errors: Optional[Dict[str, float]] = None) -> Optional[str]:
    """The spatial_quant_json column (FORMAT.md): readers divide column c of
    the dequantized weight by scales[c]. float32 values are written with
    Python's shortest repr of their exact value, so they read back exactly."""
    if scales is None:
        return None
    doc: Dict[str, Any] = {
        "method": "channel_equalization",
        "axis": 1,
        "rule": "x_hat[r, c] / scales[c]",
        "alpha": alpha,
        "scales": [float(v) for v in np.asarray(scales, dtype=np.float32)],
    }
    if proxy_errors:
        doc["proxy_error"] = {k: float(v) for k, v in proxy_errors.items()}
    return json.dumps(doc, separators=(",", ":"))


def scales_from_spatial_json(text: Optional[str]) -> Optional[np.ndarray]:
    """The column scales of a spatial_quant_json value (None when absent)."""
    if not text:
        return None
    doc = json.loads(text)
    s = doc.get("scales")
    return None if s is None else np.asarray(s, dtype=np.float32)


def undo_equalization(xhat2: np.ndarray, scales: Optional[np.ndarray]) -> np.ndarray:
    """W_hat = W'_hat / s per column (what a reader does)."""
    if scales is None:
        return xhat2
    return (xhat2 / np.asarray(scales, dtype=np.float32)[None, :]).astype(np.float32)


# --------------------------------------------------------------------------
# the pipeline's entry point


def _prepare(array: Any, dtype: Optional[str]) -> Any:
    """float64 (or other non-storage float) arrays become float32; views of
    rows become contiguous."""
    if isinstance(array, np.ndarray) and dtype is None:
        if array.dtype.kind == "f" and array.dtype.name not in QUANTIZABLE_DTYPES:
            return np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.c_contiguous:
            return np.ascontiguousarray(array)
    return array


def quantize_weighted(
    array: Any,
    *,
    bits: int,
    group_size: int = 128,
    scheme: str = "asymmetric",
    importance: Optional[np.ndarray] = None,
    equalization: Union[None, str, np.ndarray] = None,
    act_absmax: Optional[np.ndarray] = None,
    param_dtype: str = "float32",
    dtype: Optional[str] = None,
    shape: Optional[Sequence[int]] = None,
    name: str = "tensor",
    threads: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    options: Optional[SearchOptions] = None,
    row_offset: int = 0,
) -> Tuple[QuantizedTensor, Dict[str, Any]]:
    """Quantizes a chunk of rows with importance-weighted parameters and,
    optionally, channel equalization.

    - `array`: the rows (2-D, or any shape viewed as FORMAT.md section 1), of
      a quantizable float dtype, or float64; raw bytes with `dtype=` and
      `shape=` as in engine.quantize_array.
    - `importance`: per column or per input channel (e.g.
      CalibrationStats.importance(layer)); None = uniform.
    - `equalization`: None; an array of column scales (from
      plan_equalization, identical for every chunk of a tensor); or "search"
      to plan it on this array alone (needs `act_absmax`; use it only when
      the array is the whole tensor).
    - `row_offset`: the array's first row in the whole tensor (what a
      NaN / Inf position counts from).

    Returns the QuantizedTensor of the stored weight (W * s when equalized;
    its `error` sums compare the recovered W_hat = deq / s with W, so the
    report's cosine is about the real weight) and an info dict with
    "method", "equalization_alpha", "spatial_quant_json", "scales",
    "proxy_errors"."""
    check_spec(bits, group_size, scheme, "rtn", param_dtype)
    src = as_source(_prepare(array, dtype), dtype=dtype, shape=shape, name=name)
    info: Dict[str, Any] = {"method": METHOD, "equalization_alpha": None,
                            "spatial_quant_json": None, "scales": None, "proxy_errors": None}
    if equalization is None:
        qt = quantize_importance_array(src.raw, importance, bits=bits, group_size=group_size,
                                       scheme=scheme, param_dtype=param_dtype, dtype=src.dtype,
                                       shape=src.shape, name=name, threads=threads,
                                       options=options, row_offset=row_offset)
        return qt, info

    rows, cols = src.rows, src.cols
    x2 = to_float32(src.raw, src.dtype).reshape(rows, cols)
    w = per_column(importance, cols, "importance", name)
    if isinstance(equalization, str):
        if equalization != "search":
            raise ValidationError(
                f"tensor {name!r}: equalization must be None, 'search' or an array of column "
                f"scales, got {equalization!r}")
        if act_absmax is None or w is None:
            raise ValidationError(
                f"tensor {name!r}: equalization='search' needs importance and act_absmax "
                "(calibration statistics)")
        check_finite(x2, name=name, cols=cols, first_row=row_offset)
        plan = search_equalization(
            x2[sample_row_indices(rows)], np.max(np.abs(x2), axis=0), w, act_absmax, bits=bits,
            group_size=group_size, scheme=scheme, param_dtype=param_dtype, alphas=alphas,
            threads=threads, name=name)
        s = plan.scales
        info["equalization_alpha"] = plan.alpha
        info["proxy_errors"] = plan.proxy_errors
        if s is None:  # s = 1 was best: plain importance-weighted quantization
            qt = quantize_importance_array(src.raw, w, bits=bits, group_size=group_size,
                                           scheme=scheme, param_dtype=param_dtype, dtype=src.dtype,
                                           shape=src.shape, name=name, threads=threads,
                                           options=options, row_offset=row_offset)
            return qt, info
        info["spatial_quant_json"] = plan.spatial_json()
    else:
        s = per_column(equalization, cols, "equalization", name)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValidationError(f"tensor {name!r}: equalization scales must be finite and > 0")
        info["spatial_quant_json"] = spatial_quant_json(s)
    info["scales"] = s
    ws = _apply_scales(x2, s)
    w_eq = (1.0 / (s * s)).astype(np.float32) if w is None else (w / (s * s)).astype(np.float32)
    qt = quantize_importance_array(ws, w_eq, bits=bits, group_size=group_size, scheme=scheme,
                                   param_dtype=param_dtype, name=name, threads=threads,
                                   options=options, row_offset=row_offset)
    xhat = undo_equalization(dequantize_array(qt, threads=threads).reshape(rows, cols), s)
    qt.error = ErrorSums.of(x2, xhat)
    qt.shape, qt.dtype = src.shape, src.dtype
    return qt, info


def dequantize_weighted(qt: QuantizedTensor, spatial_json: Optional[str] = None, *,
                        threads: int = 0) -> np.ndarray:
    """float32 weight of qt.shape with the equalization undone."""
    rows, cols = view_2d(qt.shape)
    x = dequantize_array(qt, threads=threads).reshape(rows, cols)
    return undo_equalization(x, scales_from_spatial_json(spatial_json)).reshape(qt.shape)


def weighted_output_error(w: np.ndarray, what: np.ndarray, x: np.ndarray) -> float:
    """||x W^T - x W_hat^T||_F for activations x (n, in) and weights (out, in)."""
    d = (np.asarray(x, dtype=np.float64) @ (np.asarray(w, dtype=np.float64) -
                                              np.asarray(what, dtype=np.float64)).T)
    return float(math.sqrt(float(np.sum(d * d))))
