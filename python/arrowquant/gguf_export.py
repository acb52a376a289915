"""Moved to arrowquant.formats.gguf.export.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .formats.gguf.export import *  # noqa: F401,F403

warnings.warn("arrowquant.gguf_export is deprecated: import from arrowquant.formats.gguf.export",
              DeprecationWarning, stacklevel=2)
