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

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..config import KEEP_BITS, DiffusionQuantConfig
from ..errors import ConfigurationError, ValidationError
from ..sources.base import TensorInfo
from .allocate import AllocationSummary, allocate, layer_cost_bits
from .plan import TensorPlan
from .rules import (SENSITIVE_PATTERNS, TIMESTEP_PATTERNS, WIDTHS, match_pattern, sensitive_layer,
                    timestep_layer)
from .sensitivity import Quantizer, Sensitivity, SensitivityMeter, WeightReader, entropy_score


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
        self.meter = SensitivityMeter(config, self._importance_for, quantizer=quantizer,
                                      sample_elements=self.sample_elements, weights=weights)

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
            chosen, self.summary = allocate(cfg, tensors, plans, free, self.sensitivities)
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

    def _measure_all(self, to_measure: Sequence[TensorInfo]) -> None:
        """Measures through the source (opened here, and closed after, when it
        was given as a path) or the weights callable."""
        opened = None
        reader = self.source
        if self.weights is None and isinstance(self.source, (str, Path)):
            from ..sources import open_model

            opened = reader = open_model(self.source)
        try:
            self.sensitivities.update(self.meter.measure_all(to_measure, reader))
        finally:
            if opened is not None:
                opened.close()

    # ------------------------------------------------------------------ rules

    def _base(self, t: TensorInfo, bits: Optional[int], reason: str, rule: str) -> TensorPlan:
        cfg = self.config
        spec = cfg.spec_for(bits if bits is not None else cfg.bit_width)
        return TensorPlan(t.name, bits, group_size=spec.group_size, scheme=cfg.scheme,
                          method=spec.method, param_dtype=spec.param_dtype, reason=reason,
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

    # ------------------------------------------------------------------ allocation

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
