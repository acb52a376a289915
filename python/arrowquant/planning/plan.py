"""What the pipeline does with each tensor: a TensorPlan per tensor (its
QuantSpec, or None to keep it, and the policy around it: why, the quality
floor and the wider widths to fall back to, importance and equalization),
made by a planner (the rules here, the diffusion-aware planner of
planning.diffusion, or the calibrated wrapper) and shown in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..config import DEFAULT_MIN_COSINE
from ..sources.base import TensorInfo
from ..spec import DEFAULT_SPEC, QuantSpec


@dataclass
class TensorPlan:
    """How one tensor is quantized, and why."""

    name: str
    bits: Optional[int]                 # None: stored unquantized (quant_type "none")
    group_size: int = DEFAULT_SPEC.group_size
    scheme: str = DEFAULT_SPEC.scheme
    method: str = DEFAULT_SPEC.method
    param_dtype: str = DEFAULT_SPEC.param_dtype
    reason: str = ""                    # why these bits, for the report
    # Quality floor: the cosine a tensor must reach at its width. Below it the
    # pipeline redoes the tensor at the next of fallback_bits (checked against
    # that width's floor, min_cosine_by_bits[width]); under fail_fast it stops
    # with an error instead.
    fallback_bits: Tuple[int, ...] = ()
    min_cosine: Optional[float] = None
    min_cosine_by_bits: Dict[int, Optional[float]] = field(default_factory=dict)
    # Per-input-channel importance (length cols) for importance-weighted
    # parameter search; None for plain methods.
    importance: Optional[np.ndarray] = field(default=None, repr=False)
    # Per-input-channel equalization scales s (length cols): the stored
    # weight is W[:, c] * s[c]; readers divide by s (FORMAT.md spatial_quant_json).
    equalization: Optional[np.ndarray] = field(default=None, repr=False)
    time_aware_json: Optional[str] = None
    spatial_json: Optional[str] = None
    activation_stats_json: Optional[str] = None
    extra: dict = field(default_factory=dict)   # more report fields (sensitivity, entropy, ...)

    @property
    def spec(self) -> Optional[QuantSpec]:
        """How the tensor is quantized (None: stored unquantized)."""
        if self.bits is None:
            return None
        return QuantSpec(self.bits, self.group_size, self.scheme, self.method, self.param_dtype)

    def floor(self) -> Optional[float]:
        """The cosine floor at the plan's current width (None: no check)."""
        if self.bits is None:
            return None
        return self.min_cosine_by_bits.get(self.bits, self.min_cosine)


class Planner(Protocol):
    """Makes one TensorPlan per tensor of a model."""

    def plan(self, tensors: Sequence[TensorInfo]) -> Dict[str, TensorPlan]:
        ...


@dataclass
class RulePlanner:
    """The default planner: one bit width for every floating-point tensor of
    two or more dimensions; 0-D/1-D tensors (biases, norms) and non-float
    tensors pass through unless quantize_1d is set."""

    bits: int = DEFAULT_SPEC.bits
    group_size: int = DEFAULT_SPEC.group_size
    scheme: str = DEFAULT_SPEC.scheme
    method: str = DEFAULT_SPEC.method
    param_dtype: str = DEFAULT_SPEC.param_dtype
    quantize_1d: bool = False
    fallback: bool = False
    min_cosine: Dict[int, float] = field(default_factory=lambda: dict(DEFAULT_MIN_COSINE))

    def plan(self, tensors: Sequence[TensorInfo]) -> Dict[str, TensorPlan]:
        return {t.name: self.plan_one(t) for t in tensors}

    def plan_one(self, t: TensorInfo) -> TensorPlan:
        if not t.is_float:
            return TensorPlan(t.name, None, reason=f"kept: dtype {t.dtype} is not floating point")
        if t.numel == 0:
            return TensorPlan(t.name, None, reason="kept: empty tensor")
        if len(t.shape) < 2 and not self.quantize_1d:
            return TensorPlan(t.name, None,
                              reason=f"kept: {len(t.shape)}-D tensor (use --quantize-1d)")
        fallback: List[int] = [b for b in (2, 4, 8) if b > self.bits] if self.fallback else []
        return TensorPlan(
            t.name, self.bits, group_size=self.group_size, scheme=self.scheme,
            method=self.method, param_dtype=self.param_dtype,
            reason=f"default: {self.bits} bits for every weight",
            fallback_bits=tuple(fallback),
            min_cosine=self.min_cosine.get(self.bits) if self.fallback else None,
            min_cosine_by_bits=dict(self.min_cosine) if self.fallback else {},
        )
