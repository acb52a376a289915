"""Moved to arrowquant.sizes.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .sizes import *  # noqa: F401,F403

warnings.warn("arrowquant.units is deprecated: import from arrowquant.sizes",
              DeprecationWarning, stacklevel=2)
