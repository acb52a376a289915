"""Bits per layer under a bits-per-weight budget (mixed precision).

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import DiffusionQuantConfig
from ..errors import ConfigurationError
from ..sources.base import TensorInfo
from ..spec import stored_bytes
from .plan import TensorPlan
from .rules import WIDTHS
from .sensitivity import Sensitivity


def layer_cost_bits(info: TensorInfo, bits: Optional[int], group_size: int,
                    param_dtype: str) -> int:
    """Stored bits of a tensor: codes plus one scale and one zero point per
    group, or the source bytes when kept (bits None)."""
    if bits is None:
        return 8 * int(info.nbytes)
    # Rows start on a byte boundary (FORMAT.md section 3): count the padding too.
    return 8 * stored_bytes(info.rows, info.cols, bits, group_size, param_dtype)


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


def allocate(cfg: DiffusionQuantConfig, tensors: Sequence[TensorInfo],
             plans: Dict[str, TensorPlan], free: List[TensorInfo],
             sensitivities: Mapping[str, Sensitivity]
             ) -> Tuple[Dict[str, Tuple[Optional[int], str]], AllocationSummary]:
    """Bits (or None = keep) for each free layer under the budget, and the
    summary of the allocation (see the module doc)."""
    def cost_of(t: TensorInfo, b: Optional[int]) -> int:
        spec = cfg.spec_for(b if b is not None else cfg.bit_width)
        return layer_cost_bits(t, b, spec.group_size, spec.param_dtype)

    floats = [t for t in tensors if t.is_float and t.numel > 0]
    total_weights = sum(t.numel for t in floats)
    free_names = {t.name for t in free}
    fixed_cost = sum(cost_of(t, plans[t.name].bits)
                     for t in floats if t.name not in free_names)

    # Options per free layer: (label, bits, cost, weighted error), cheapest first.
    options: List[List[Tuple[str, Optional[int], float, float]]] = []
    for t in free:
        sens = sensitivities[t.name]
        opts = []
        for b in WIDTHS:
            thr = cfg.min_cosine(b)
            if thr is not None and sens.cosine[b] < thr:
                continue  # would be redone at a wider width anyway
            opts.append((f"{b} bits", b, float(cost_of(t, b)),
                         t.numel * sens.error[b]))
        opts.append(("keep", None, float(cost_of(t, None)), 0.0))
        opts.sort(key=lambda o: (o[2], o[3]))
        options.append(opts)

    if cfg.target_bpw is not None:
        budget = cfg.target_bpw * total_weights
        target = float(cfg.target_bpw)
    else:
        budget = fixed_cost + sum(cost_of(t, cfg.bit_width) for t in free)
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
        c = fixed_cost + sum(cost_of(t, b) for t in free)
        e = sum(t.numel * sensitivities[t.name].error[b] for t in free)
        uniform[b] = (c / total_weights, e)
    summary = AllocationSummary(target_bpw=target, achieved_bpw=spent / total_weights,
                                total_error=total_error, uniform=uniform,
                                layers_by_choice=by_choice)
    return chosen, summary
