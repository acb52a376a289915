"""Moved to arrowquant.engine.weighted.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .engine.weighted import *  # noqa: F401,F403

warnings.warn("arrowquant.importance is deprecated: import from arrowquant.engine.weighted",
              DeprecationWarning, stacklevel=2)
