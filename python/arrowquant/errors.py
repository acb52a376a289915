"""Exception hierarchy. The C++ engine returns Status values; the binding maps
each status code to one of these classes (see cpp/src/python/module.cc)."""

from __future__ import annotations


class ArrowQuantError(Exception):
    """Base class of every error ArrowQuant raises on purpose."""


class ValidationError(ArrowQuantError, ValueError):
    """Bad input values or arguments (NaN weights, group size 0, bits 3, ...)."""


class ConfigurationError(ArrowQuantError, ValueError):
    """A configuration value out of range or inconsistent."""


class FormatError(ArrowQuantError):
    """A file whose contents do not follow its format."""


class MetadataError(FormatError):
    """Model metadata (metadata.json, config.json, headers) that cannot be used."""


class ShapeMismatchError(ValidationError):
    """Shapes, element counts or byte counts that disagree."""


class ModelNotFoundError(ArrowQuantError, FileNotFoundError):
    """A model path, shard or tensor that does not exist."""


class ArrowQuantIOError(ArrowQuantError, OSError):
    """The operating system refused a read or write (disk full, permissions)."""


class MemoryBudgetError(ArrowQuantError, MemoryError):
    """The memory budget cannot hold what one step needs."""


class QuantizationError(ArrowQuantError):
    """Quantization of a tensor failed (for example a layer below its quality floor)."""


class CancelledError(ArrowQuantError):
    """A run stopped on request."""


__all__ = [
    "ArrowQuantError",
    "ValidationError",
    "ConfigurationError",
    "FormatError",
    "MetadataError",
    "ShapeMismatchError",
    "ModelNotFoundError",
    "ArrowQuantIOError",
    "MemoryBudgetError",
    "QuantizationError",
    "CancelledError",
]
