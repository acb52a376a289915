"""Moved to arrowquant.sources.safetensors (reader) and formats.safetensors_writer.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .sources.safetensors import SafeTensorsModel, open_safetensors, DTYPE_SIZES  # noqa: F401
from .formats.safetensors_writer import SafeTensorsWriter  # noqa: F401
from .engine.dtypes import SAFETENSORS_CODES  # noqa: F401

warnings.warn("arrowquant.safetensors_io is deprecated: import from arrowquant.sources.safetensors",
              DeprecationWarning, stacklevel=2)
