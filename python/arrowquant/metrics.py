"""Moved to arrowquant.engine.metrics.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .engine.metrics import *  # noqa: F401,F403

warnings.warn("arrowquant.metrics is deprecated: import from arrowquant.engine.metrics",
              DeprecationWarning, stacklevel=2)
