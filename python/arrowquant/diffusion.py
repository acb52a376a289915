"""The diffusion-aware planner: per-layer rules, measured sensitivity, bit
allocation under a bits-per-weight budget, and fallback settings.

Decision order for each tensor (the first that applies decides; the rule that
matched is `plan.extra["rule"]`):

1. not floating point, or empty -> stored unquantized;
2. `keep_patterns` (--keep) -> stored unquantized;
3. 0-D / 1-D tensors (biases, norm weights) -> stored unquantized unless
   `quantize_1d`;
4. `bits_for` (--bits-for PATTERN=BITS, first matching rule; 16 = keep) ->
   those bits. An explicit rule also overrides the INT8 floor of step 6 and
   the reason says so;
5. `skip_sensitive_layers` and a default sensitive pattern (embeddings,
   norms, lm_head / output heads: SENSITIVE_PATTERNS) -> unquantized;
6. timestep-embedding / adaptive-norm modulation layers (TIMESTEP_PATTERNS)
   -> 8 bits (no less than INT8);
7. everything else -> `bit_width`, or, with mixed precision (`target_bpw` or
   `enable_mixed_precision`), the allocator's choice among 2, 4, 8 and keep.

Patterns: shell-style (fnmatch, case-sensitive, matched against the whole
tensor name: "*.attn1.*") or "re:REGEX" (re.search anywhere in the name:
"re:to_[qkv]"). The built-in lists are regexes, case-insensitive.

Sensitivity: for each quantized layer the planner reads a bounded sample of
its rows (at most `sample_elements` float32 values, default 2^18 = 1 MiB, in
up to 8 contiguous blocks spread evenly over the rows; whole rows, so groups
are the real groups) and quantizes it at 2, 4 and 8 bits with the layer's
settings. `sensitivity[b]` is the relative squared error
sum((w - w_hat)^2) / sum(w^2) on the sample, weighted per input channel by
`importance` when importance is known for the layer (calibration statistics).
`entropy` is the first version's score: the normalized Shannon entropy of a
256-bin histogram of the sample (0 = one value, 1 = uniform).

Allocation (mixed precision): each free layer l chooses an option o in
{2, 4, 8, keep} with cost bits(l, o) = rows*ceil(cols*o/8)*8 + rows*G*2*p
(packed codes with each row's byte padding, plus p = 32 bits, or 16 with
param_dtype float16, per scale and per zero point; with param_dtype
superblock two float16 units per super-block and 2 * (4 or 6) code bits per
group instead, plan.param_bytes; keep costs the source bytes): the bytes the
ArrowQuant file stores for the tensor (superblock: to a byte per chunk) and error
numel * sensitivity[o] (keep: 0). Widths whose sampled cosine is already below
that width's fallback threshold are not offered (the pipeline would redo
them). Greedy marginal gain: start every layer at its cheapest option, then
repeatedly take the upgrade with the largest error drop per extra bit that
still fits the budget. The budget is target_bpw times the number of weights
of all floating-point tensors of the model (tensors kept or fixed by rules
count with their real cost); `enable_mixed_precision` without target_bpw uses
the cost of uniform `bit_width` as the budget.

Fallback semantics (set here, executed by the pipeline): a quantized plan
with bits b carries `min_cosine` = fallback_thresholds[b] (None when the
threshold is 0) and `fallback_bits` = the wider widths, in order. When the
tensor's cosine is below min_cosine the pipeline redoes it at the next width
of fallback_bits and checks it against `min_cosine_by_bits[width]`. When no
width is left the last result is kept and flagged in the report. Under
`fail_fast` (PipelineOptions.fail_fast = config.fail_fast) the pipeline raises
QuantizationError at the first tensor below its threshold instead of redoing
it, 8-bit plans included.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import KEEP_BITS, DiffusionQuantConfig
from .errors import ConfigurationError, ValidationError
from .plan import TensorInfo, TensorPlan, stored_bytes

WIDTHS = (2, 4, 8)

#: Layers that compute or apply the timestep embedding / adaptive-norm
#: modulation: errors here shift every activation at every step, so they
#: stay at INT8 or better. (label, regex), case-insensitive.
TIMESTEP_PATTERNS: List[Tuple[str, str]] = [
    ("time embedding", r"time_?embed"),
    ("time embedding projection", r"time_emb_proj"),
    ("timestep embedder", r"(?:^|[._])t(?:imestep)?_embedder"),
    ("time-text embedding", r"time_text_embed"),
    ("adaLN modulation", r"adaln"),
    ("adaptive-norm modulation", r"(?:^|[._])norm\d*(?:_context|_out)?\.linear"),
    ("adaptive-norm conditioning embedding", r"(?:^|[._])norm\d*\.emb\."),
    ("modulation", r"modulation|_mod\.lin"),
    ("emb_layers", r"emb_layers"),
    ("scale-shift table", r"scale_shift_table"),
    ("DiT output modulation", r"^proj_out_1\."),
    ("added conditioning embedding", r"add_embedding|class_embedding|label_emb"),
]

#: Kept unquantized under skip_sensitive_layers. (label, regex), case-insensitive.
SENSITIVE_PATTERNS: List[Tuple[str, str]] = [
    ("embedding", r"embed|(?:^|\.)(?:wte|wpe)\."),
    ("norm", r"norm|(?:^|\.)ln_?(?:f|\d+)?\."),
    ("output head", r"(?:^|\.)(?:lm_head|classifier|score|head)\.|^(?:conv_out|proj_out(?:_\d)?|norm_out)\."),
]

_TIMESTEP_RX = [(label, re.compile(rx, re.IGNORECASE)) for label, rx in TIMESTEP_PATTERNS]
_SENSITIVE_RX = [(label, re.compile(rx, re.IGNORECASE)) for label, rx in SENSITIVE_PATTERNS]

#: A callable returning a float32 array for a tensor name (2-D view or any shape).
WeightReader = Callable[[str], np.ndarray]
#: (sample float32 2-D, bits, group_size, scheme, method, param_dtype, importance) -> dequantized
Quantizer = Callable[..., np.ndarray]


def _weighted_quantizer() -> Optional[Callable[..., Any]]:
    """arrowquant.importance.quantize_importance_array (the calibration
    component's importance-weighted search) when it is installed."""
    try:
        from .importance import quantize_importance_array
    except ImportError:
        return None
    return quantize_importance_array


def match_pattern(pattern: str, name: str) -> bool:
    """fnmatch on the whole name, or re.search for "re:REGEX"."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def timestep_layer(name: str) -> Optional[str]:
    """The label of the timestep / modulation pattern `name` matches, or None."""
    for label, rx in _TIMESTEP_RX:
        if rx.search(name):
            return label
    return None


def sensitive_layer(name: str) -> Optional[str]:
    for label, rx in _SENSITIVE_RX:
        if rx.search(name):
            return label
    return None


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


def layer_cost_bits(info: TensorInfo, bits: Optional[int], group_size: int,
                    param_dtype: str) -> int:
    """Stored bits of a tensor: codes plus one scale and one zero point per
    group, or the source bytes when kept (bits None)."""
    if bits is None:
        return 8 * int(info.nbytes)
    # Rows start on a byte boundary (FORMAT.md section 3): count the padding too.
    return 8 * stored_bytes(info.rows, info.cols, bits, group_size, param_dtype)


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


@dataclass
class AllocationSummary:
    """The allocator's outcome, for the report."""

    target_bpw: float
    achieved_bpw: float
    total_error: float                     # sum over free layers of numel * error
    uniform: Dict[int, Tuple[float, float]] = field(default_factory=dict)  # bits -> (bpw, error)
    layers_by_choice: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"target_bpw": self.target_bpw, "achieved_bpw": self.achieved_bpw,
                "total_error": self.total_error,
                "uniform": {b: {"bpw": v[0], "error": v[1]} for b, v in self.uniform.items()},
                "layers_by_choice": dict(self.layers_by_choice)}


class DiffusionPlanner:
    """Planner (plan.py protocol) for diffusion models and LLMs.

    config: the run's DiffusionQuantConfig.
    stats: calibration statistics giving per-input-channel importance: a
      Mapping name -> array, or an object with `importance(name)` returning
      an array or None. Looked up by tensor name, then without ".weight".
    source: an arrowquant.sources ModelSource (its `read(name, row_start,
      row_count)` gives raw bytes of rows), used to measure sensitivity; or
      the model's path, opened with arrowquant.sources.open_model for the
      measurement and closed after it (so a planner made before
      arrowquant.quantize(..., planner=) opens it does not hold it open).
    weights: instead of a source, a callable name -> float32 array.
    importance: name -> per-input-channel importance (length cols, or the
      input channels of a conv, repeated over its kernel); wins over stats.
    quantizer: how a sample is quantized for the measurement: a callable
      (sample, bits=, group_size=, scheme=, method=, param_dtype=,
      importance=) -> dequantized float32 array of the sample's shape.
      Default: engine.quantize_array (config.method) for unweighted layers;
      for layers with importance, arrowquant.importance's weighted search
      when that module exists, else the plain method with a weighted error.

    The planner does not set plan.importance / plan.equalization: wrap it in
    arrowquant.calibrated.CalibratedPlanner(DiffusionPlanner(...), stats,
    source) for that; this planner uses the importance only to measure.
    sample_elements: bound on the values read per tensor for the measurement.
    measure: measure sensitivity (default: when weights can be read).
    """

    def __init__(self, config: DiffusionQuantConfig, stats: Any = None, source: Any = None, *,
                 weights: Optional[WeightReader] = None,
                 importance: Optional[Mapping[str, np.ndarray]] = None,
                 quantizer: Optional[Quantizer] = None,
                 sample_elements: int = 1 << 18,
                 measure: Optional[bool] = None) -> None:
        config.validate()
        if sample_elements < 1:
            raise ValidationError(f"sample_elements must be positive, got {sample_elements}")
        self.config = config
        self.stats = stats
        self.source = source
        self.weights = weights
        self.importance = dict(importance or {})
        self.quantizer = quantizer
        self.sample_elements = int(sample_elements)
        can_read = source is not None or weights is not None
        self.measure = can_read if measure is None else bool(measure)
        if self.measure and not can_read:
            raise ConfigurationError("measuring sensitivity needs the weights: pass source= "
                                     "or weights=")
        if config.mixed_precision and not self.measure:
            raise ConfigurationError(
                "mixed precision (target_bpw / enable_mixed_precision) allocates bits from "
                "measured sensitivity and needs the weights: pass source= or weights=")
        self.summary: Optional[AllocationSummary] = None
        self.sensitivities: Dict[str, Sensitivity] = {}
        self._reader: Any = None

    # ------------------------------------------------------------------ plan

    def plan(self, tensors: Sequence[TensorInfo]) -> Dict[str, TensorPlan]:
        cfg = self.config
        plans: Dict[str, TensorPlan] = {}
        free: List[TensorInfo] = []
        for t in tensors:
            p = self._rule_plan(t)
            if p is None:
                free.append(t)
            else:
                plans[t.name] = p

        # Measure every tensor that will be quantized (for the report and the
        # allocator); a second plan() of the same model reuses the measurements.
        infos = {t.name: t for t in tensors}
        if self.measure:
            to_measure = [infos[n] for n, p in plans.items() if p.bits is not None] + free
            to_measure = [t for t in to_measure if t.name not in self.sensitivities]
            if to_measure:
                self._measure_all(to_measure)

        if cfg.mixed_precision and free:
            chosen = self._allocate(tensors, plans, free)
        else:
            chosen = {t.name: (cfg.bit_width, "default") for t in free}

        for t in free:
            bits, how = chosen[t.name]
            plans[t.name] = self._free_plan(t, bits, how)

        for name, p in plans.items():
            sens = self.sensitivities.get(name)
            if sens is not None:
                p.extra.update(sens.as_dict())
            if p.bits is not None:
                self._set_fallback(p)
        return {t.name: plans[t.name] for t in tensors}

    # ------------------------------------------------------------------ rules

    def _base(self, t: TensorInfo, bits: Optional[int], reason: str, rule: str) -> TensorPlan:
        cfg = self.config
        return TensorPlan(t.name, bits, group_size=cfg.group_size, scheme=cfg.scheme,
                          method=cfg.method, param_dtype=cfg.param_dtype, reason=reason,
                          extra={"rule": rule})

    def _rule_plan(self, t: TensorInfo) -> Optional[TensorPlan]:
        """The plan fixed by a rule, or None for a layer left to bit_width / the allocator."""
        cfg = self.config
        if not t.is_float:
            return self._base(t, None, f"kept: dtype {t.dtype} is not floating point", "dtype")
        if t.numel == 0:
            return self._base(t, None, "kept: empty tensor", "empty")
        for pat in cfg.keep_patterns:
            if match_pattern(pat, t.name):
                return self._base(t, None, f"kept: matches --keep {pat!r}", f"keep:{pat}")
        if len(t.shape) < 2 and not cfg.quantize_1d:
            return self._base(t, None, f"kept: {len(t.shape)}-D tensor (use --quantize-1d)", "1-D")
        ts_label = timestep_layer(t.name)
        for pat, bits in cfg.bits_for.items():
            if match_pattern(pat, t.name):
                if bits == KEEP_BITS:
                    return self._base(t, None, f"kept: --bits-for {pat}={bits}",
                                      f"bits-for:{pat}")
                reason = f"--bits-for {pat}={bits}"
                if ts_label is not None and bits < 8:
                    reason += f" (overrides the INT8 floor of {ts_label} layers)"
                return self._base(t, bits, reason, f"bits-for:{pat}")
        if cfg.skip_sensitive_layers:
            label = sensitive_layer(t.name)
            if label is not None:
                return self._base(t, None, f"kept: sensitive layer ({label}) under "
                                  "skip_sensitive_layers", f"sensitive:{label}")
        if ts_label is not None:
            return self._base(t, 8, f"{ts_label}: kept at >= INT8 (timestep-embedding / "
                              "adaptive-norm modulation layer)", f"timestep:{ts_label}")
        return None

    def _free_plan(self, t: TensorInfo, bits: Optional[int], how: str) -> TensorPlan:
        cfg = self.config
        sens = self.sensitivities.get(t.name)
        if how == "default":
            # A measured layer whose sample is already below its width's
            # threshold starts at the first width that is not (the pipeline
            # would redo it anyway); fail_fast leaves it to fail in the pipeline.
            if sens is not None and not cfg.fail_fast:
                for b in [w for w in WIDTHS if w >= bits]:
                    thr = cfg.min_cosine(b)
                    if thr is None or sens.cosine[b] >= thr:
                        if b != bits:
                            return self._base(
                                t, b, f"sensitivity: sampled cosine {sens.cosine[bits]:.4f} < "
                                f"{cfg.min_cosine(bits)} at {bits} bits; planned at {b}",
                                "sensitivity")
                        break
            return self._base(t, bits, f"default: {bits} bits", "default")
        errs = ", ".join(f"{sens.error[w]:.3g} at {w}" for w in WIDTHS) if sens else ""
        if bits is None:
            return self._base(t, None, f"kept: mixed precision ({how}; relative error {errs})",
                              "mixed-precision")
        return self._base(t, bits, f"mixed precision: {bits} bits ({how}; relative error {errs})",
                          "mixed-precision")

    def _set_fallback(self, p: TensorPlan) -> None:
        cfg = self.config
        p.min_cosine = cfg.min_cosine(p.bits)
        wider = tuple(w for w in WIDTHS if w > p.bits)
        # Under fail_fast (PipelineOptions.fail_fast) the pipeline raises
        # instead of redoing.
        p.fallback_bits = wider if p.min_cosine is not None else ()
        p.min_cosine_by_bits = {w: cfg.min_cosine(w) for w in (p.bits,) + wider}

    # ------------------------------------------------------------------ importance

    def _importance_for(self, t: TensorInfo) -> Optional[np.ndarray]:
        """Per-column importance of a tensor: the explicit `importance` dict
        (a wrong length is an error), else the statistics (a layer they do not
        fit is measured unweighted, like the calibrated planner does)."""
        keys = [t.name] + ([t.name[: -len(".weight")]] if t.name.endswith(".weight") else [])
        for key in keys:
            if key in self.importance:
                return self._per_column(t, self.importance[key], strict=True)
        if self.stats is None:
            return None
        for key in keys:
            if isinstance(self.stats, Mapping):
                imp = self.stats.get(key)
            elif hasattr(self.stats, "resolve"):
                # arrowquant.calibration.CalibrationStats: resolve the layer, then ask.
                layer = self.stats.resolve(key)
                imp = None if layer is None else self.stats.importance(layer)
            else:
                imp = self.stats.importance(key)
            if imp is not None:
                return self._per_column(t, imp, strict=False)
        return None

    @staticmethod
    def _per_column(t: TensorInfo, imp: Any, strict: bool) -> Optional[np.ndarray]:
        imp = np.asarray(imp, dtype=np.float32).reshape(-1)
        cols = t.cols
        if imp.size != cols:
            if imp.size > 0 and cols % imp.size == 0:
                imp = np.repeat(imp, cols // imp.size)  # conv: one value per input channel
            elif strict:
                raise ValidationError(
                    f"tensor {t.name!r}: importance has {imp.size} values, expected {cols} "
                    f"(columns) or a divisor of it (input channels)")
            else:
                return None
        if not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise ValidationError(f"tensor {t.name!r}: importance must be finite and >= 0")
        return imp

    # ------------------------------------------------------------------ measurement

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
            from .reference import to_float32

            parts = []
            for s, c in zip(starts, counts):
                raw = np.asarray(self._reader.read(t.name, s, c)).reshape(-1).view(np.uint8)
                parts.append(to_float32(raw, t.dtype).reshape(c, cols))
        sample = np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)
        return sample

    def _quantize_sample(self, sample: np.ndarray, bits: int, importance: Optional[np.ndarray],
                         name: str) -> np.ndarray:
        cfg = self.config
        if self.quantizer is not None:
            return np.asarray(self.quantizer(
                sample, bits=bits, group_size=cfg.group_size, scheme=cfg.scheme,
                method=cfg.method, param_dtype=cfg.param_dtype, importance=importance),
                dtype=np.float32).reshape(sample.shape)
        from .engine import dequantize_array, quantize_array

        if importance is not None and cfg.param_dtype != "superblock":
            # (The weighted search has no two-level parameters: a superblock
            # layer is measured with the plain method and a weighted error.)
            weighted = _weighted_quantizer()
            if weighted is not None:
                # What the calibrated pipeline will do with this layer.
                qt = weighted(sample, importance, bits=bits, group_size=cfg.group_size,
                              scheme=cfg.scheme, param_dtype=cfg.param_dtype, name=name,
                              threads=cfg.num_threads)
                return dequantize_array(qt, threads=cfg.num_threads)

        qt = quantize_array(sample, bits=bits, group_size=cfg.group_size, scheme=cfg.scheme,
                            method=cfg.method, param_dtype=cfg.param_dtype, name=name,
                            threads=cfg.num_threads)
        return dequantize_array(qt, threads=cfg.num_threads)

    def _measure_all(self, to_measure: Sequence[TensorInfo]) -> None:
        opened = None
        if self.weights is None and isinstance(self.source, (str, Path)):
            from .sources import open_model

            opened = self._reader = open_model(self.source)
        else:
            self._reader = self.source
        try:
            for t in to_measure:
                self.sensitivities[t.name] = self._measure(t)
        finally:
            self._reader = None
            if opened is not None:
                opened.close()

    def _measure(self, t: TensorInfo) -> Sensitivity:
        sample = self._sample(t)
        if not np.all(np.isfinite(sample)):
            raise ValidationError(f"tensor {t.name!r}: NaN or Inf in the weights")
        imp = self._importance_for(t)
        if imp is None and self.quantizer is None:
            # Unweighted: the engine's own error sums give both numbers
            # without dequantizing the sample.
            from .engine import quantize_array

            cfg = self.config
            err, cos = {}, {}
            for b in WIDTHS:
                m = quantize_array(sample, bits=b, group_size=cfg.group_size, scheme=cfg.scheme,
                                   method=cfg.method, param_dtype=cfg.param_dtype, name=t.name,
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

    # ------------------------------------------------------------------ allocation

    def _allocate(self, tensors: Sequence[TensorInfo], plans: Dict[str, TensorPlan],
                  free: List[TensorInfo]) -> Dict[str, Tuple[Optional[int], str]]:
        cfg = self.config
        g, pd = cfg.group_size, cfg.param_dtype
        floats = [t for t in tensors if t.is_float and t.numel > 0]
        total_weights = sum(t.numel for t in floats)
        free_names = {t.name for t in free}
        fixed_cost = sum(layer_cost_bits(t, plans[t.name].bits, g, pd)
                         for t in floats if t.name not in free_names)

        # Options per free layer: (label, bits, cost, weighted error), cheapest first.
        options: List[List[Tuple[str, Optional[int], float, float]]] = []
        for t in free:
            sens = self.sensitivities[t.name]
            opts = []
            for b in WIDTHS:
                thr = cfg.min_cosine(b)
                if thr is not None and sens.cosine[b] < thr:
                    continue  # would be redone at a wider width anyway
                opts.append((f"{b} bits", b, float(layer_cost_bits(t, b, g, pd)),
                             t.numel * sens.error[b]))
            opts.append(("keep", None, float(layer_cost_bits(t, None, g, pd)), 0.0))
            opts.sort(key=lambda o: (o[2], o[3]))
            options.append(opts)

        if cfg.target_bpw is not None:
            budget = cfg.target_bpw * total_weights
            target = float(cfg.target_bpw)
        else:
            budget = fixed_cost + sum(layer_cost_bits(t, cfg.bit_width, g, pd) for t in free)
            target = budget / total_weights

        L = len(free)
        width = max(len(o) for o in options)
        cost = np.full((L, width), np.inf)
        error = np.full((L, width), np.inf)
        for i, opts in enumerate(options):
            for j, o in enumerate(opts):
                cost[i, j] = o[2]
                error[i, j] = o[3]
        state = np.zeros(L, dtype=np.int64)
        rows_idx = np.arange(L)
        spent = fixed_cost + float(cost[rows_idx, state].sum())
        if spent > budget * (1 + 1e-12):
            raise ConfigurationError(
                f"target_bpw {target:.4g} cannot be met: the smallest choice for every layer "
                f"(layers fixed by rules included) gives {spent / total_weights:.4f} bits per "
                f"weight; raise target_bpw or relax --keep/--bits-for")
        # Greedy marginal gain, vectorized over layers and options.
        while True:
            cur_c = cost[rows_idx, state][:, None]
            cur_e = error[rows_idx, state][:, None]
            dc = cost - cur_c
            de = cur_e - error
            ok = (dc > 0) & (de > 0) & (dc <= budget - spent + 1e-9)
            if not ok.any():
                break
            ratio = np.full(ok.shape, -np.inf)
            ratio[ok] = de[ok] / dc[ok]
            i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            spent += float(dc[i, j])
            state[i] = j

        chosen: Dict[str, Tuple[Optional[int], str]] = {}
        by_choice: Dict[str, int] = {}
        total_error = 0.0
        for i, t in enumerate(free):
            label, bits, _c, e = options[i][state[i]]
            total_error += e
            by_choice[label] = by_choice.get(label, 0) + 1
            chosen[t.name] = (bits, f"allocated for {target:.4g} bits per weight")
        uniform: Dict[int, Tuple[float, float]] = {}
        for b in WIDTHS:
            c = fixed_cost + sum(layer_cost_bits(t, b, g, pd) for t in free)
            e = sum(t.numel * self.sensitivities[t.name].error[b] for t in free)
            uniform[b] = (c / total_weights, e)
        self.summary = AllocationSummary(target_bpw=target, achieved_bpw=spent / total_weights,
                                         total_error=total_error, uniform=uniform,
                                         layers_by_choice=by_choice)
        return chosen


__all__ = [
    "DiffusionPlanner",
    "TIMESTEP_PATTERNS",
    "SENSITIVE_PATTERNS",
    "AllocationSummary",
    "Sensitivity",
    "entropy_score",
    "layer_cost_bits",
    "match_pattern",
    "timestep_layer",
    "sensitive_layer",
]
