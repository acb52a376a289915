"""SafeTensors models: one ``.safetensors`` file or a sharded Hugging Face /
diffusers model (``*.safetensors.index.json`` + shards).

Headers are parsed and validated completely by the C++ reader
(cpp/src/safetensors.cc) before any data is read; files are read with
pread into caller buffers, never mapped. Every problem is an arrowquant.errors
exception whose message names the file: FormatError for bad contents,
ModelNotFoundError for missing files or tensors, ValidationError for bad
arguments or a path that leaves the model directory.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..engine import core
from ..engine.dtypes import ITEMSIZE
from ..files import allowed_root
from ..jsonfile import MODEL_METADATA_SCHEMA, read_json
from ..errors import ArrowQuantError, ArrowQuantIOError, FormatError, ModelNotFoundError, ValidationError
from ..spec import view_2d
from .base import ModelSource, TensorInfo

PathLike = Union[str, "os.PathLike[str]"]

#: Element sizes of the canonical dtype names the reader reports.
DTYPE_SIZES: Dict[str, int] = ITEMSIZE

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


def _allowed_root(root: Path) -> Path:
    return allowed_root(root)


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
    for tensor, file_name in weight_map.items():  # before any is used as a key
        if not isinstance(file_name, str) or not file_name:
            raise FormatError(f"{index_path}: key 'weight_map.{tensor}': weight_map file name "
                              f"{file_name!r} is not a non-empty string")
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
        handle = core.SafeTensorsFile(str(path), self._drop_cache)
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



def open_safetensors(path: PathLike, **kwargs: Any) -> SafeTensorsModel:
    """Opens a SafeTensors model (file, index or directory)."""
    return SafeTensorsModel(path, **kwargs)




class SafeTensorsSource(ModelSource):
    """One SafeTensors file or a sharded model (index + shards), read by the
    C++ reader with pread into caller buffers."""

    format = "safetensors"

    def __init__(self, path: Path, root: Path):
        self.root = root
        # pread into our buffers: file pages stay in the page cache (warm for
        # the next run) without counting in this process's resident memory.
        self._model = SafeTensorsModel(path)
        self.tensors = list(self._model.tensors)
        self.metadata = dict(self._model.metadata or {})
        meta_path = root / "metadata.json"
        if meta_path.exists():
            self.metadata.update(read_json(meta_path, MODEL_METADATA_SCHEMA))

    @property
    def weight_files(self) -> List[Path]:
        return [Path(p) for p in self._model.files]

    def location(self, name: str) -> str:
        return str(self._model.file_of(name))

    def read(self, name: str, row_start: int = 0, row_count: Optional[int] = None,
             out: Optional[np.ndarray] = None) -> np.ndarray:
        t = self.info(name)
        if row_count is None:
            row_count = t.rows - row_start
        return self._model.read_rows(name, row_start, row_count, out=out)

    def close(self) -> None:
        self._model.close()
