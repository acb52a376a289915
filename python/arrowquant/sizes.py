"""Parsing and printing sizes ("512MiB", "2GB", 1048576)."""

from __future__ import annotations

import re
from typing import Union

from .errors import ConfigurationError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(value: Union[str, int, float], what: str = "size") -> int:
    """Bytes in `value`: an integer, or a number with a unit (KiB, MB, GiB, ...)."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{what}: expected a size such as 512MiB, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigurationError(
                f"{what}: cannot read {value!r}; use a number of bytes or a unit such as "
                "512MiB, 1.5GB, 2GiB"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigurationError(f"{what} must be positive, got {value!r}")
    return n


def format_size(n: float) -> str:
    """Human-readable binary size: 1.5 GiB, 230.0 MiB, 12 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
