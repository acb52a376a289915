"""Moved to arrowquant.reference.superblock.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .reference.superblock import *  # noqa: F401,F403

warnings.warn("arrowquant.reference_superblock is deprecated: import from arrowquant.reference.superblock",
              DeprecationWarning, stacklevel=2)
