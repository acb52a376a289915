"""What the pipeline does with each tensor: a TensorPlan per tensor, made by a
planner (the default rules here, or the diffusion-aware planner of
arrowquant.diffusion) and shown in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .tensor import (QUANTIZABLE_DTYPES, View2D, groups_per_row, packed_row_bytes,
                     param_code_bytes, superblock_code_bits, superblocks_per_row)

#: Minimum cosine similarity per bit width below which a layer is redone at the
#: next width (issue 5's fallback); configurable through QuantOptions.
DEFAULT_MIN_COSINE: Dict[int, float] = {2: 0.70, 4: 0.90, 8: 0.95}


def param_bytes(rows: int, cols: int, bits: int, group_size: int, param_dtype: str) -> int:
    """Bytes the group parameters of `rows` rows take in a V2 file: a scale
    and a zero point per group at 4 bytes (float32) or 2 (float16); with
    "superblock", two float16 units per super-block plus one packed stream of
    2 * p bits per group (p = 4 at INT2, 6 otherwise; FORMAT.md section 9).
    The stream is padded to a byte per V2 row, so a tensor stored in several
    chunks may take up to one byte more per extra chunk."""
    G = groups_per_row(cols, group_size)
    if param_dtype == "superblock":
        return rows * superblocks_per_row(cols, group_size) * 2 * 2 + \
            param_code_bytes(rows * G, superblock_code_bits(bits))
    return rows * G * 2 * (2 if param_dtype == "float16" else 4)


def stored_bytes(rows: int, cols: int, bits: int, group_size: int, param_dtype: str) -> int:
    """Bytes of `rows` quantized rows in a V2 file: packed codes (each row
    padded to a byte, FORMAT.md section 3) plus param_bytes()."""
    return rows * packed_row_bytes(cols, bits) + param_bytes(rows, cols, bits, group_size,
                                                             param_dtype)


@dataclass(frozen=True)
class TensorInfo(View2D):
    """A tensor of a source model, before reading it."""

    name: str
    shape: Tuple[int, ...]
    dtype: str          # canonical name ("float16", "bfloat16", "int64", ...)
    nbytes: int         # bytes in the source

    @property
    def is_float(self) -> bool:
        return self.dtype in QUANTIZABLE_DTYPES


@dataclass
class TensorPlan:
    """How one tensor is quantized, and why."""

    name: str
    bits: Optional[int]                 # None: stored unquantized (quant_type "none")
    group_size: int = 128
    scheme: str = "asymmetric"
    method: str = "rtn"
    param_dtype: str = "float32"
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

    bits: int = 4
    group_size: int = 128
    scheme: str = "asymmetric"
    method: str = "mse"
    param_dtype: str = "float16"
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
