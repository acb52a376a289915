"""A planner wrapper that turns calibration statistics into per-tensor plans:
importance-weighted parameters for every weight the statistics cover, and
channel equalization scales computed once per tensor (a first pass over the
tensor's rows; see arrowquant.engine.weighted.plan_equalization).

    stats = load_stats("stats.parquet")
    source = open_model("model/")
    planner = CalibratedPlanner(RulePlanner(bits=4), stats, source)
    quantize("model/", "out/", planner=planner)

or, where plans already exist and the source is open (api.quantize):

    apply_calibration(plans, source.tensors, stats, source)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..calibration.stats import CalibrationStats, load_stats
from ..engine.dtypes import to_float32
from ..engine.weighted import METHOD, SearchOptions, per_column, plan_equalization
from ..errors import ConfigurationError
from ..sources.base import TensorInfo
from ..spec import GRID_METHODS, weighted_param_spec
from .plan import Planner, TensorPlan


@dataclass
class CalibratedPlanner:
    """Wraps a planner: the base decides the bits (and what is kept);
    this adds importance, equalization and the report columns. With base
    None it only annotates existing plans (apply_calibration)."""

    base: Optional[Planner]
    stats: CalibrationStats
    source: Any                         # a ModelSource (read(name, row_start, row_count) -> raw
                                        # bytes), or the model's path
    equalization: bool = True
    importance_mode: str = "max"
    floor: float = 1e-3
    threads: int = 0
    read_rows: int = 4096               # rows per read in the equalization pass
    ranking_options: Optional[SearchOptions] = None   # alpha ranking (default RANKING_OPTIONS)

    def plan(self, tensors: Sequence[TensorInfo]) -> Dict[str, TensorPlan]:
        if self.base is None:
            raise ConfigurationError("CalibratedPlanner.plan needs a base planner; use "
                                     "apply_calibration to annotate existing plans")
        plans = self.base.plan(tensors)
        opened = None
        if isinstance(self.source, (str, Path)):
            # A path: opened for the equalization pass and closed after it, so
            # a planner made before arrowquant.quantize opens the model does
            # not hold it open.
            from ..sources import open_model

            opened = self.source
            self.source = open_model(opened)
        try:
            for t in tensors:
                p = plans.get(t.name)
                if p is None or p.bits is None:
                    continue
                self.apply(t, p)
        finally:
            if opened is not None:
                self.source.close()
                self.source = opened
        return plans

    def apply(self, t: TensorInfo, p: TensorPlan) -> TensorPlan:
        key = self.stats.resolve(t.name)
        if key is None or len(t.shape) < 2:
            p.extra["calibration"] = "no statistics for this tensor"
            return p
        imp = self.stats.importance(key, mode=self.importance_mode, floor=self.floor)
        if imp.size == 0 or t.cols % imp.size:
            p.extra["calibration"] = (f"statistics have {imp.size} channels, the weight "
                                      f"{t.cols} columns: not used")
            return p
        p.importance = per_column(imp, t.cols, "importance", t.name)
        grid = p.method in GRID_METHODS  # a code grid weights its own search and table
        if not grid:
            p.method = METHOD
            # The weighted search stores float16 / float32 parameters: superblock
            # ones become float16 at twice the group (the same bits per weight).
            p.group_size, p.param_dtype = weighted_param_spec(p.group_size, p.param_dtype)
        p.time_aware_json = self.stats.time_aware_json(key)
        p.activation_stats_json = self.stats.activation_stats_json(key)
        reason = "importance-weighted parameters from calibration statistics"
        if self.equalization and grid:
            p.extra["equalization"] = "not applied: a code grid takes importance weights only"
        elif self.equalization:
            eq = plan_equalization(
                lambda r0, n: self._rows(t, r0, n), t.rows, t.cols, p.importance,
                self.stats.act_absmax(key), bits=p.bits, group_size=p.group_size,
                scheme=p.scheme, param_dtype=p.param_dtype, chunk_rows=self.read_rows,
                threads=self.threads, options=self.ranking_options, name=t.name)
            p.extra["equalization_alpha"] = eq.alpha
            p.extra["equalization_proxy_errors"] = eq.proxy_errors
            if eq.scales is not None:
                p.equalization = eq.scales
                p.spatial_json = eq.spatial_json()
                reason += f", channel equalization alpha {eq.alpha:g}"
            else:
                reason += ", equalization searched but not used (s = 1 was best)"
        p.reason = f"{p.reason}; {reason}" if p.reason else reason
        return p

    def _rows(self, t: TensorInfo, r0: int, n: int) -> np.ndarray:
        raw = self.source.read(t.name, r0, n)
        return to_float32(np.asarray(raw, dtype=np.uint8).reshape(-1), t.dtype).reshape(n, t.cols)


def apply_calibration(plans: Dict[str, TensorPlan], tensors: Sequence[TensorInfo],
                      stats: Any, source: Any, *, equalization: bool = True,
                      importance_mode: str = "max", threads: int = 0
                      ) -> Dict[str, TensorPlan]:
    """Adds importance / equalization / report JSON to existing plans (in
    place) for every quantized tensor the statistics cover. `stats` is a
    CalibrationStats or the path of a statistics file."""
    if not isinstance(stats, CalibrationStats):
        stats = load_stats(stats)
    helper = CalibratedPlanner(base=None, stats=stats, source=source,
                               equalization=equalization, importance_mode=importance_mode,
                               threads=threads)
    for t in tensors:
        p = plans.get(t.name)
        if p is not None and p.bits is not None:
            helper.apply(t, p)
    return plans


