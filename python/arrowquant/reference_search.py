"""Moved to arrowquant.reference.search.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .reference.search import *  # noqa: F401,F403
from .reference.search import _groups, _Search, _stats, _clips  # noqa: F401

warnings.warn("arrowquant.reference_search is deprecated: import from arrowquant.reference.search",
              DeprecationWarning, stacklevel=2)
