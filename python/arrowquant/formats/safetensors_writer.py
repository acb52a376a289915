"""SafeTensors writer: one pass, header first, then the tensors' bytes in
order, in pieces of any size, into a temporary file renamed into place by
`close()` (used by `arrowquant dequantize`)."""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..engine.dtypes import ITEMSIZE as DTYPE_SIZES
from ..engine.dtypes import SAFETENSORS_CODES
from ..engine.dtypes import safetensors_dtype as _canonical_dtype
from ..files import remove_stale_temporaries
from ..errors import ArrowQuantIOError, ValidationError

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class _Pending:
    name: str
    nbytes: int
    written: int = 0


def _as_bytes(data: Any) -> memoryview:
    """A flat byte view of a bytes-like object or numpy array (C order)."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data).reshape(-1)
        return memoryview(arr.view(np.uint8))
    try:
        mv = memoryview(data)
    except TypeError:
        raise ValidationError(f"expected bytes-like data or a numpy array, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise ValidationError("data must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


class SafeTensorsWriter:
    """Writes a SafeTensors file in one pass.

    specs: (name, dtype, shape) per tensor, in the order their data will be
    written; dtype is a canonical name ("float16", "bfloat16", "int64", ...)
    or a SafeTensors code ("F16", ...). The header goes first; `write(name,
    data)` then appends bytes to the current tensor (any number of pieces;
    tensors in order; empty tensors need no call). `close()` checks that every
    byte arrived and renames the temporary file into place; any error aborts:
    the temporary is removed and `path` is left as it was.
    """

    def __init__(self, path: PathLike, specs: Sequence[Tuple[str, str, Sequence[int]]],
                 metadata: Optional[Mapping[str, str]] = None) -> None:
        self.path = Path(path)
        self._file = None
        self._tmp: Optional[Path] = None
        self._done = False
        header, self._pending = self._build_header(specs, metadata)
        self._current = 0
        remove_stale_temporaries(self.path.parent, self.path.name)  # of a killed earlier run
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            self._file = open(self._tmp, "xb")
            self._file.write(len(header).to_bytes(8, "little"))
            self._file.write(header)
        except OSError as e:
            self.abort()
            raise ArrowQuantIOError(f"{self.path}: cannot write: {e}") from None

    def _build_header(self, specs: Sequence[Tuple[str, str, Sequence[int]]],
                      metadata: Optional[Mapping[str, str]]) -> Tuple[bytes, List[_Pending]]:
        doc: Dict[str, Any] = {}
        if metadata:
            for k, v in metadata.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ValidationError(f"{self.path}: SafeTensors metadata must map str to str, "
                                          f"got {k!r}: {v!r}")
            doc["__metadata__"] = dict(metadata)
        pending: List[_Pending] = []
        offset = 0
        for spec in specs:
            try:
                name, dtype, shape = spec
            except (TypeError, ValueError):
                raise ValidationError(f"{self.path}: a spec must be (name, dtype, shape), got {spec!r}") from None
            if not isinstance(name, str) or name == "__metadata__" or "\x00" in name:
                raise ValidationError(f"{self.path}: invalid tensor name {name!r}")
            if name in doc:
                raise ValidationError(f"{self.path}: tensor {name!r} appears more than once")
            canonical = _canonical_dtype(dtype)
            dims: List[int] = []
            for d in shape:
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 0:
                    raise ValidationError(f"{self.path}: tensor {name!r}: bad dimension {d!r} in {shape!r}")
                dims.append(int(d))
            nbytes = math.prod(dims) * DTYPE_SIZES[canonical]
            if math.prod(d for d in dims if d) >= 2**63 or nbytes >= 2**63:
                raise ValidationError(f"{self.path}: tensor {name!r}: shape {dims} is too large")
            doc[name] = {"dtype": SAFETENSORS_CODES[canonical], "shape": dims,
                         "data_offsets": [offset, offset + nbytes]}
            pending.append(_Pending(name, nbytes))
            offset += nbytes
        try:
            header = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{self.path}: a tensor name or metadata string is not valid Unicode") from None
        # Pad with spaces so the data section starts 8-byte aligned, as the
        # reference writer does.
        header += b" " * (-len(header) % 8)
        return header, pending

    def _skip_complete(self) -> None:
        while self._current < len(self._pending):
            p = self._pending[self._current]
            if p.written < p.nbytes:
                return
            self._current += 1

    def write(self, name: str, data: Any) -> None:
        """Appends `data` (bytes-like or numpy array) to tensor `name`."""
        if self._done:
            raise ValidationError(f"{self.path}: writer is closed")
        try:
            mv = _as_bytes(data)
            # Move past finished tensors, but not past the one named: a later
            # write of zero bytes to a complete tensor is harmless.
            while (self._current < len(self._pending)
                   and self._pending[self._current].name != name
                   and self._pending[self._current].written == self._pending[self._current].nbytes):
                self._current += 1
            if self._current >= len(self._pending):
                raise ValidationError(f"{self.path}: every tensor is complete; no room for {name!r}")
            p = self._pending[self._current]
            if name != p.name:
                known = any(q.name == name for q in self._pending)
                raise ValidationError(
                    f"{self.path}: tensors must be written in order: expected {p.name!r}, got "
                    + (f"{name!r}" if known else f"unknown tensor {name!r}"))
            if p.written + mv.nbytes > p.nbytes:
                raise ValidationError(
                    f"{self.path}: tensor {name!r} holds {p.nbytes} bytes; "
                    f"{p.written + mv.nbytes} were given")
            assert self._file is not None
            try:
                self._file.write(mv)
            except OSError as e:
                raise ArrowQuantIOError(f"{self.path}: write failed: {e}") from None
            p.written += mv.nbytes
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Checks completeness, syncs, and renames the file into place."""
        if self._done:
            return
        try:
            self._skip_complete()
            if self._current < len(self._pending):
                p = self._pending[self._current]
                raise ValidationError(
                    f"{self.path}: tensor {p.name!r} got {p.written} of {p.nbytes} bytes "
                    "when the writer was closed")
            assert self._file is not None and self._tmp is not None
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp, self.path)
                self._tmp = None
            except OSError as e:
                raise ArrowQuantIOError(f"{self.path}: cannot finish the file: {e}") from None
            self._done = True
            self._file = None
            self._sync_directory()
        except BaseException:
            self.abort()
            raise

    def _sync_directory(self) -> None:
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Stops writing and removes the temporary file. Idempotent."""
        self._done = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
            self._tmp = None

    @property
    def temp_path(self) -> Optional[Path]:
        return self._tmp

    def __enter__(self) -> "SafeTensorsWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
