"""Moved to arrowquant.reference.importance.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .reference.importance import *  # noqa: F401,F403

warnings.warn("arrowquant.reference_importance is deprecated: import from arrowquant.reference.importance",
              DeprecationWarning, stacklevel=2)
