"""Text that comes from files or from the operating system, decoded in one
place with one policy for bad bytes.

- Text inside a file (JSON documents, GGUF keys, string values and tensor
  names, SafeTensors and Parquet names) must be valid UTF-8, as the formats
  say; anything else is a FormatError naming the file, the field and the
  offset of the first bad byte. Nothing is silently replaced.
- Paths are bytes on Linux; Python keeps undecodable bytes as surrogates.
  Such a path is refused where a library needs text (pyarrow), and every
  message shows a path with the bad bytes escaped (`\\xff`), so printing an
  error never fails."""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigurationError, FormatError


def decode_text(raw: bytes, where: Any, what: str) -> str:
    """UTF-8 text of `raw`; a FormatError naming `where` (the file) and `what`
    (the field) on a bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{printable(where)}: {what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                          f"at offset {e.start})") from None


def printable(value: Any) -> str:
    """`value` as text that can always be printed: a path's undecodable bytes
    (surrogates) and any other unencodable character are escaped."""
    s = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
        if _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_path_text(path: Any, what: str = "path") -> None:
    """Refuses a path that is not valid UTF-8 (the Parquet library cannot
    name such a file)."""
    if _has_surrogates(os.fsdecode(path)):
        raise ConfigurationError(f"{printable(path)}: the {what} is not valid UTF-8; "
                                 "choose a name made of valid UTF-8 text")
