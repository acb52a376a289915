"""Planning: what happens to each tensor (a TensorPlan), decided before any
chunk is quantized. rules.py holds the per-layer rules, sensitivity.py the
measurements, allocate.py the bit allocation under a budget; diffusion.py
combines them (DiffusionPlanner, the planner of every run), calibrated.py
adds importance and equalization from calibration statistics."""

from __future__ import annotations

from .plan import DEFAULT_MIN_COSINE, Planner, RulePlanner, TensorPlan

__all__ = ["TensorPlan", "Planner", "RulePlanner", "DEFAULT_MIN_COSINE"]
