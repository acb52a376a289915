"""Moved to arrowquant.planning.calibrated.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .planning.calibrated import *  # noqa: F401,F403

warnings.warn("arrowquant.calibrated is deprecated: import from arrowquant.planning.calibrated",
              DeprecationWarning, stacklevel=2)
