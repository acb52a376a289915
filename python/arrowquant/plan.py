"""Moved to arrowquant.planning.plan (TensorInfo: sources.base; sizes: spec).

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .planning.plan import DEFAULT_MIN_COSINE, TensorPlan, Planner, RulePlanner  # noqa: F401
from .sources.base import TensorInfo  # noqa: F401
from .spec import param_bytes, stored_bytes  # noqa: F401

warnings.warn("arrowquant.plan is deprecated: import from arrowquant.planning.plan",
              DeprecationWarning, stacklevel=2)
