"""SafeTensors models in and out.

`SafeTensorsModel` opens one ``.safetensors`` file or a sharded Hugging Face
model (``*.safetensors.index.json`` + shards) and reads raw bytes of row
ranges of the FORMAT.md 2-D view into caller buffers. Headers are parsed and
validated completely by the C++ reader (cpp/src/safetensors.cc) before any
data is read; files are read with pread, never mapped.

`SafeTensorsWriter` writes a SafeTensors file in one pass: header first, then
the tensors' bytes in order, in pieces of any size, into a temporary file that
is renamed into place by `close()`.

Every problem is an arrowquant.errors exception whose message names the file:
FormatError for bad contents, ModelNotFoundError for missing files or
tensors, ValidationError for bad arguments or a path that leaves the model
directory.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .errors import (
    ArrowQuantError,
    ArrowQuantIOError,
    FormatError,
    ModelNotFoundError,
    ValidationError,
)
from .plan import TensorInfo
from .tensor import view_2d

PathLike = Union[str, "os.PathLike[str]"]

#: Element sizes of the canonical dtype names the reader reports.
DTYPE_SIZES: Dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
#: Canonical dtype name -> SafeTensors dtype code.
SAFETENSORS_CODES: Dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_CODE_TO_NAME = {code: name for name, code in SAFETENSORS_CODES.items()}

#: Index files preferred, in order, when a directory holds several.
_PREFERRED_INDEXES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_PREFERRED_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
#: An index larger than this is not a real index (the biggest public ones are a few MB).
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Location:
    file_index: int
    info: TensorInfo
    itemsize: int


def _canonical_dtype(dtype: str) -> str:
    if dtype in SAFETENSORS_CODES:
        return dtype
    if dtype in _CODE_TO_NAME:
        return _CODE_TO_NAME[dtype]
    raise ValidationError(
        f"unsupported dtype {dtype!r}; expected one of {', '.join(SAFETENSORS_CODES)} "
        f"(or the SafeTensors codes {', '.join(_CODE_TO_NAME)})"
    )


def _allowed_root(root: Path) -> Path:
    """The directory shard files must resolve into. A Hugging Face cache
    snapshot (.../models--x--y/snapshots/<rev>/) holds symlinks to
    ../../blobs/<hash>, so there the repository's cache folder is allowed."""
    real = root.resolve()
    if real.parent.name == "snapshots":
        return real.parent.parent
    return real


def _check_shard_name(name: Any, index_path: Path, root: Path, allowed: Path) -> Path:
    """Validates one weight_map file name and returns its path under root."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{index_path}: weight_map file name {name!r} is not a non-empty string")
    if "\x00" in name or "\\" in name:
        raise ValidationError(f"{index_path}: shard file name {name!r} contains a NUL or backslash")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("/"):
        raise ValidationError(
            f"{index_path}: shard file name {name!r} is an absolute path; "
            "shards must be inside the model directory")
    if ".." in pure.parts:
        raise ValidationError(
            f"{index_path}: shard file name {name!r} contains '..'; "
            "shards must be inside the model directory")
    path = root / pure
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # symlink loops, names too long
        raise ValidationError(f"{index_path}: shard file name {name!r} cannot be resolved: {e}") from None
    if real != allowed and allowed not in real.parents:
        raise ValidationError(
            f"{index_path}: shard {name!r} resolves to {real}, outside the model directory "
            f"{allowed} (a symlink that escapes it)")
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system cannot exist
        return False


def _load_index(index_path: Path) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """(weight_map, metadata) of an index file, validated for shape."""
    try:
        size = index_path.stat().st_size
    except FileNotFoundError:
        raise ModelNotFoundError(f"{index_path}: no such index file") from None
    if size > MAX_INDEX_BYTES:
        raise FormatError(f"{index_path}: index of {size} bytes is larger than the "
                          f"{MAX_INDEX_BYTES}-byte limit")

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise FormatError(f"{index_path}: key {k!r} appears more than once")
            out[k] = v
        return out

    try:
        with open(index_path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"), object_pairs_hook=pairs)
    except UnicodeDecodeError as e:
        raise FormatError(f"{index_path}: index is not valid UTF-8: {e}") from None
    except RecursionError:
        raise FormatError(f"{index_path}: index JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{index_path}: index is not valid JSON: {e}") from None
    except OSError as e:
        raise ArrowQuantIOError(f"{index_path}: cannot read index: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{index_path}: index must be a JSON object")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: index has no \"weight_map\" object")
    if not weight_map:
        raise FormatError(f"{index_path}: \"weight_map\" lists no tensors")
    metadata = doc.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{index_path}: index \"metadata\" must be an object")
    return weight_map, metadata


class SafeTensorsModel:
    """A SafeTensors model opened for reading: one file or an index + shards.

    `path` is a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or
    a directory holding one of them (``model.safetensors.index.json`` and
    ``diffusion_pytorch_model.safetensors.index.json`` are preferred when
    there are several). Nothing outside the model directory is ever opened.
    At most `max_open_files` shard descriptors are kept open at a time; a
    shard reopened later must still have the header it had when validated.
    """

    def __init__(self, path: PathLike, *, drop_cache: bool = False, max_open_files: int = 64) -> None:
        self.path = Path(path)
        self._drop_cache = drop_cache
        self._max_open = max(1, int(max_open_files))
        self._handles: "OrderedDict[int, Any]" = OrderedDict()
        self._headers: List[List[tuple]] = []
        self._locations: Dict[str, _Location] = {}
        self.index_path: Optional[Path] = None
        self.files: List[Path] = []
        self.tensors: List[TensorInfo] = []
        self.metadata: Dict[str, Any] = {}
        self._closed = False
        try:
            self._open()
        except ArrowQuantError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise ArrowQuantIOError(f"{self.path}: {e}") from None
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------

    def _open(self) -> None:
        p = self.path
        if not p.exists():
            raise ModelNotFoundError(f"{p}: no such file or directory")
        if p.is_dir():
            self.root = p
            index = self._find_index(p)
            if index is not None:
                self._open_sharded(index)
            else:
                self._open_single(self._find_single(p))
        elif p.name.endswith(".index.json"):
            self.root = p.parent
            self._open_sharded(p)
        else:
            self.root = p.parent
            self._open_single(p)

    @staticmethod
    def _find_index(d: Path) -> Optional[Path]:
        for name in _PREFERRED_INDEXES:
            if (d / name).is_file():
                return d / name
        found = sorted(x for x in d.glob("*.safetensors.index.json") if x.is_file())
        if len(found) > 1:
            raise ValidationError(
                f"{d}: several SafeTensors indexes ({', '.join(x.name for x in found)}); "
                "pass the one to use")
        return found[0] if found else None

    @staticmethod
    def _find_single(d: Path) -> Path:
        for name in _PREFERRED_FILES:
            if (d / name).is_file():
                return d / name
        found = sorted(x for x in d.glob("*.safetensors") if x.is_file())
        if not found:
            raise ModelNotFoundError(f"{d}: no .safetensors file or *.safetensors.index.json")
        if len(found) > 1:
            raise ValidationError(
                f"{d}: several .safetensors files ({', '.join(x.name for x in found)}) and no "
                "index; pass the file to use")
        return found[0]

    def _open_single(self, path: Path) -> None:
        self.files = [path]
        handle = self._handle(0)
        self._add_file_tensors(0, self._headers[0])
        self.metadata = dict(handle.metadata())

    def _open_sharded(self, index_path: Path) -> None:
        self.index_path = index_path
        weight_map, index_metadata = _load_index(index_path)
        allowed = _allowed_root(self.root)
        by_file: Dict[str, List[str]] = {}
        for tensor_name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(tensor_name)
        # Every name is checked before any shard is touched.
        shard_paths = {name: _check_shard_name(name, index_path, self.root, allowed) for name in by_file}
        order = sorted(by_file)
        missing = [name for name in order if not _is_file(shard_paths[name])]
        if missing:
            raise ModelNotFoundError(
                f"{index_path}: {len(missing)} shard(s) named in the index are missing: "
                + ", ".join(missing))
        self.files = [shard_paths[name] for name in order]
        merged: Dict[str, Any] = {}
        for i, name in enumerate(order):
            handle = self._handle(i)
            listed = set(by_file[name])
            present = {t[0] for t in self._headers[i]}
            absent = sorted(listed - present)
            if absent:
                raise FormatError(
                    f"{index_path}: tensor {absent[0]!r} is listed in shard {name!r} but "
                    f"{self.files[i]} does not hold it ({len(absent)} missing)")
            extra = sorted(present - listed)
            if extra:
                raise FormatError(
                    f"{self.files[i]}: holds tensor {extra[0]!r} that the index {index_path.name} "
                    f"does not list for this shard ({len(extra)} unlisted)")
            for k, v in handle.metadata().items():
                merged.setdefault(k, v)
            self._add_file_tensors(i, self._headers[i])
        merged.update(index_metadata)
        self.metadata = merged

    def _add_file_tensors(self, file_index: int, header: List[tuple]) -> None:
        # Header order by offset, as the C++ reader returns it.
        for name, dtype, shape, _offset, nbytes in header:
            info = TensorInfo(name=name, shape=tuple(int(d) for d in shape), dtype=dtype,
                              nbytes=int(nbytes))
            self._locations[name] = _Location(file_index, info, DTYPE_SIZES[dtype])
            self.tensors.append(info)

    def _handle(self, file_index: int) -> Any:
        """The open reader of a file, (re)opening it within the descriptor budget."""
        if self._closed:
            raise ValidationError(f"{self.path}: model is closed")
        handle = self._handles.get(file_index)
        if handle is not None:
            self._handles.move_to_end(file_index)
            return handle
        path = self.files[file_index]
        handle = _core.SafeTensorsFile(str(path), self._drop_cache)
        header = handle.tensors()
        if file_index < len(self._headers):
            if header != self._headers[file_index]:
                handle.close()
                raise FormatError(f"{path}: header changed since the model was opened")
        else:
            self._headers.append(header)
        self._handles[file_index] = handle
        while len(self._handles) > self._max_open:
            _, old = self._handles.popitem(last=False)
            old.close()
        return handle

    # -- reading -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._locations

    def info(self, name: str) -> TensorInfo:
        return self._location(name).info

    def file_of(self, name: str) -> Path:
        return self.files[self._location(name).file_index]

    def _location(self, name: str) -> _Location:
        loc = self._locations.get(name)
        if loc is None:
            raise ModelNotFoundError(f"{self.path}: no tensor named {name!r}")
        return loc

    def read_rows(self, name: str, row_start: int = 0, row_count: Optional[int] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
        """Raw bytes of rows [row_start, row_start + row_count) of the 2-D view
        (FORMAT.md section 1) of tensor `name`, as a 1-D uint8 array. With `out`
        (a writable C-contiguous uint8 array at least that long) the bytes go
        into it and the returned array is a view of its first bytes."""
        loc = self._location(name)
        info = loc.info
        rows, cols = view_2d(info.shape)
        if isinstance(row_start, bool) or not isinstance(row_start, (int, np.integer)):
            raise ValidationError(f"{name}: row_start must be an integer, got {row_start!r}")
        if row_count is None:
            row_count = rows - int(row_start)
        if isinstance(row_count, bool) or not isinstance(row_count, (int, np.integer)):
            raise ValidationError(f"{name}: row_count must be an integer, got {row_count!r}")
        row_start, row_count = int(row_start), int(row_count)
        if row_start < 0 or row_count < 0 or row_start + row_count > rows:
            raise ValidationError(
                f"{self.file_of(name)}: tensor {name!r}: rows [{row_start}, {row_start + row_count}) "
                f"out of range ({rows} rows)")
        row_bytes = cols * loc.itemsize
        count = row_count * row_bytes
        if out is None:
            buf = np.empty(count, dtype=np.uint8)
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
                raise ValidationError(f"{name}: out must be a uint8 numpy array")
            if not out.flags.c_contiguous or not out.flags.writeable:
                raise ValidationError(f"{name}: out must be C-contiguous and writable")
            if out.size < count:
                raise ValidationError(
                    f"{name}: out holds {out.size} bytes, {count} needed for {row_count} rows")
            buf = out.reshape(-1)[:count]
        self._handle(loc.file_index).read_into(name, row_start * row_bytes, buf)
        return buf

    def read_tensor(self, name: str) -> np.ndarray:
        """The whole tensor's raw bytes (1-D uint8). For tests and small tensors."""
        return self.read_rows(name)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        while self._handles:
            _, handle = self._handles.popitem()
            handle.close()

    def __enter__(self) -> "SafeTensorsModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafeTensorsModel({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.files)} files)"


# ---------------------------------------------------------------------------


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


def open_safetensors(path: PathLike, **kwargs: Any) -> SafeTensorsModel:
    """Opens a SafeTensors model (file, index or directory)."""
    return SafeTensorsModel(path, **kwargs)


__all__ = ["SafeTensorsModel", "SafeTensorsWriter", "open_safetensors", "DTYPE_SIZES",
           "SAFETENSORS_CODES"]
