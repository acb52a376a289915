"""Moved to arrowquant.planning.diffusion (rules, sensitivity, allocate).

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .planning.diffusion import *  # noqa: F401,F403
from .planning.rules import WIDTHS  # noqa: F401

warnings.warn("arrowquant.diffusion is deprecated: import from arrowquant.planning.diffusion",
              DeprecationWarning, stacklevel=2)
