"""Moved to arrowquant.sources.modality.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .sources.modality import *  # noqa: F401,F403

warnings.warn("arrowquant.modality is deprecated: import from arrowquant.sources.modality",
              DeprecationWarning, stacklevel=2)
