"""Model sources: find the weights in a path and read them tensor by tensor,
row range by row range, in bounded memory.

Formats: SafeTensors (one file, a sharded Hugging Face / diffusers model with
an index; read by the C++ reader in arrowquant.safetensors_io), Parquet V1
(FORMAT.md section 4; one row group at a time through pyarrow), and ArrowQuant
Parquet V2 (dequantized on read, for export and validation)."""

from __future__ import annotations

import abc
import json
import math
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import FormatError, ModelNotFoundError
from .plan import TensorInfo
from .tensor import QUANTIZABLE_DTYPES

#: Files that hold weights (never copied to the output as "other files").
WEIGHT_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                   ".msgpack", ".onnx")
_V1_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ITEMSIZE = {**QUANTIZABLE_DTYPES, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
             "uint8": 1, "bool": 1}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


class ModelSource(abc.ABC):
    """Common interface of every reader."""

    format: str = ""
    root: Path
    tensors: List[TensorInfo]
    metadata: Dict[str, Any]

    @abc.abstractmethod
    def read(self, name: str, row_start: int = 0, row_count: Optional[int] = None,
             out: Optional[np.ndarray] = None) -> np.ndarray:
        """Raw little-endian bytes (uint8) of rows [row_start, row_start+row_count)
        of the tensor's 2-D view; written into `out` when given."""

    def location(self, name: str) -> str:
        """The file a tensor is read from, for error messages."""
        return str(self.root)

    @property
    def modality_hint(self) -> Optional[str]:
        m = self.metadata.get("modality")
        return m if isinstance(m, str) else None

    @property
    def weight_files(self) -> List[Path]:
        return []

    @property
    def extra_files(self) -> List[Path]:
        """Non-weight files beside the weights (config.json, tokenizer files, ...)."""
        if not self.root.is_dir():
            return []
        weights = {p.resolve() for p in self.weight_files}
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.resolve() not in weights and not p.name.endswith(WEIGHT_SUFFIXES) \
                    and not p.name.endswith(".index.json") and p.name != "metadata.json":
                out.append(p)
        return out

    def info(self, name: str) -> TensorInfo:
        by_name = self.__dict__.get("_by_name")
        if by_name is None or len(by_name) != len(self.tensors):
            by_name = self.__dict__["_by_name"] = {t.name: t for t in self.tensors}
        try:
            return by_name[name]
        except KeyError:
            raise ModelNotFoundError(f"{self.root}: no tensor named {name!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rows_slice(t: TensorInfo, row_start: int, row_count: Optional[int]) -> tuple:
    rows, cols = t.rows, t.cols
    if row_count is None:
        row_count = rows - row_start
    if row_start < 0 or row_count < 0 or row_start + row_count > rows:
        raise ValueError(f"rows [{row_start}, {row_start + row_count}) outside tensor {t.name!r} "
                         f"with {rows} rows")
    row_bytes = cols * itemsize(t.dtype) if t.numel else 0
    return row_start * row_bytes, row_count * row_bytes


def _into(view: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    if out is None:
        return view
    dst = out.reshape(-1).view(np.uint8)[: view.size]
    dst[...] = view
    return dst


class ParquetV1Source(ModelSource):
    """Parquet V1 weights: one row per tensor (FORMAT.md section 4)."""

    format = "parquet-v1"
    REQUIRED = ("layer_name", "shape", "dtype", "data", "num_params")

    def __init__(self, files: Sequence[Path], root: Path):
        self.root = root
        self.files = list(files)
        meta_path = root / "metadata.json" if root.is_dir() else root.parent / "metadata.json"
        self.metadata = {}
        if meta_path.exists():
            try:
                self.metadata = json.loads(meta_path.read_text())
            except ValueError as exc:
                raise FormatError(f"{meta_path}: invalid JSON ({exc})") from None
            if not isinstance(self.metadata, dict):
                raise FormatError(f"{meta_path}: expected a JSON object")
        self.tensors = []
        self._where: Dict[str, tuple] = {}
        self._pf: Dict[Path, pq.ParquetFile] = {}
        self._cache_key: Optional[tuple] = None
        self._cache: Optional[pa.Array] = None
        self._lock = threading.Lock()  # the pipeline reads from a thread of its own
        for f in self.files:
            self._index(f)

    @property
    def weight_files(self) -> List[Path]:
        return self.files

    def _index(self, f: Path) -> None:
        from .parquet_v2 import (_is_blob, _is_int, _is_int_list, _is_str, check_schema,
                                 check_row_group_holds, check_shape)

        try:
            # No pre-buffering: it would hold a second copy of the row group.
            pf = pq.ParquetFile(str(f), pre_buffer=False)
            check_schema(f, pf.schema_arrow, {"layer_name": _is_str, "shape": _is_int_list,
                                              "dtype": _is_str, "data": _is_blob,
                                              "num_params": _is_int})
        except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: bad UTF-8 in the footer
            raise FormatError(f"{f}: not a readable Parquet file ({type(exc).__name__}: {exc})") \
                from None
        if (pf.schema_arrow.metadata or {}).get(b"arrowquant.format") == b"parquet-v2":
            raise FormatError(f"{f}: an ArrowQuant Parquet V2 file, not Parquet V1 weights (the "
                              "V2 directory's metadata.json is missing or unreadable)")
        self._pf[f] = pf
        for rg in range(pf.num_row_groups):
            try:
                t = pf.read_row_group(rg, columns=["layer_name", "shape", "dtype", "num_params"])
                rows = t.to_pylist()  # strings are decoded here: invalid UTF-8 is a ValueError
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise FormatError(f"{f}: row group {rg} unreadable ({type(exc).__name__}: {exc})") \
                    from None
            need = 0
            for i, row in enumerate(rows):
                name, shape, dtype, n = row["layer_name"], row["shape"], row["dtype"], row["num_params"]
                if name is None or shape is None or dtype is None or n is None:
                    raise FormatError(f"{f}: row {i} of row group {rg} has null fields")
                if name in self._where:
                    raise FormatError(f"{f}: duplicate tensor name {name!r}")
                if dtype not in _V1_DTYPES:
                    raise FormatError(f"{f}: tensor {name!r} has dtype {dtype!r}; Parquet V1 allows "
                                      "float32, float16, bfloat16")
                check_shape(f"{f}: tensor {name!r}", shape, n)
                self._where[name] = (f, rg, i)
                self.tensors.append(TensorInfo(name, tuple(shape), dtype, n * _V1_DTYPES[dtype]))
                need += n * _V1_DTYPES[dtype]
            check_row_group_holds(f, pf, rg, rows, need)

    def _tensor_bytes(self, name: str) -> np.ndarray:
        f, rg, i = self._where[name]
        if self._cache_key != (f, rg):
            self._cache = None  # release the previous row group first
            try:
                col = self._pf[f].read_row_group(rg, columns=["data"]).column(0)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise FormatError(f"{f}: row group {rg} unreadable ({exc})") from None
            self._cache = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
            self._cache_key = (f, rg)
        from .parquet_v2 import _blob_view

        try:
            return _blob_view(self._cache, i)
        except (FormatError, IndexError) as exc:
            raise FormatError(f"{f}: tensor {name!r}: {exc}") from None

    def location(self, name: str) -> str:
        return str(self._where[name][0]) if name in self._where else str(self.root)

    def read(self, name: str, row_start: int = 0, row_count: Optional[int] = None,
             out: Optional[np.ndarray] = None) -> np.ndarray:
        t = self.info(name)
        with self._lock:
            blob = self._tensor_bytes(name)
        if blob.size != t.nbytes:
            raise FormatError(f"{self._where[name][0]}: tensor {name!r} has {blob.size} data bytes, "
                              f"shape {list(t.shape)} of {t.dtype} needs {t.nbytes}")
        off, n = _rows_slice(t, row_start, row_count)
        return _into(blob[off: off + n], out)

    def close(self) -> None:
        self._cache = None
        self._cache_key = None
        self._pf.clear()


class SafeTensorsSource(ModelSource):
    """One SafeTensors file or a sharded model (index + shards), read by the
    C++ reader with pread into caller buffers."""

    format = "safetensors"

    def __init__(self, path: Path, root: Path):
        from .safetensors_io import SafeTensorsModel

        self.root = root
        # pread into our buffers: file pages stay in the page cache (warm for
        # the next run) without counting in this process's resident memory.
        self._model = SafeTensorsModel(path)
        self.tensors = list(self._model.tensors)
        self.metadata = dict(self._model.metadata or {})
        meta_path = root / "metadata.json"
        if meta_path.exists():
            try:
                self.metadata.update(json.loads(meta_path.read_text()))
            except ValueError as exc:
                raise FormatError(f"{meta_path}: invalid JSON ({exc})") from None

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


class ParquetV2Source(ModelSource):
    """An ArrowQuant V2 model read back as float32 (dequantized) tensors."""

    format = "arrowquant-parquet-v2"

    def __init__(self, root: Path):
        from .parquet_v2 import QuantizedModel, readback_dtype

        self.root = root
        self.model = QuantizedModel(root)
        self.metadata = dict(self.model.metadata)
        self.tensors = []
        for e in self.model.entries.values():
            dtype = readback_dtype(e.dtype) if e.quant_type == "none" else "float32"
            self.tensors.append(TensorInfo(e.name, e.shape, dtype,
                                           math.prod(e.shape) * itemsize(dtype)))
        self._cache_key: Optional[tuple] = None
        self._cache: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    @property
    def modality_hint(self) -> Optional[str]:
        return self.metadata.get("modality")

    @property
    def weight_files(self) -> List[Path]:
        return list(self.model.files)

    @property
    def extra_files(self) -> List[Path]:
        return [p for p in super().extra_files if p.name != "quantization_report.json"]

    def read(self, name: str, row_start: int = 0, row_count: Optional[int] = None,
             out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows dequantized chunk by chunk (one chunk cached), so reading a
        large tensor holds one chunk, not the tensor."""
        t = self.info(name)
        entry = self.model.info(name)
        if row_count is None:
            row_count = t.rows - row_start
        _rows_slice(t, row_start, row_count)  # range check
        row_bytes = t.cols * itemsize(t.dtype)
        pieces = []
        for loc in sorted(entry.chunks, key=lambda c: c.row_start):
            lo = max(row_start, loc.row_start)
            hi = min(row_start + row_count, loc.row_start + loc.row_count)
            if lo >= hi:
                continue
            with self._lock:
                if self._cache_key != (name, loc.row_start):
                    self._cache = None
                    arr = np.ascontiguousarray(self.model.dequantize_chunk(name, loc))
                    self._cache = arr.reshape(-1).view(np.uint8)
                    self._cache_key = (name, loc.row_start)
                cache = self._cache
            a = (lo - loc.row_start) * row_bytes
            pieces.append(cache[a: a + (hi - lo) * row_bytes])
        if not pieces:
            view = np.zeros(0, np.uint8)
        else:
            view = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return _into(view, out)

    def close(self) -> None:
        self._cache = None
        self.model.close()


def is_v2_dir(root: Path) -> bool:
    meta = root / "metadata.json"
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == "arrowquant-parquet-v2"
    except (ValueError, AttributeError, OSError):
        return False


def is_pipeline_dir(root: Path) -> bool:
    """A diffusers pipeline: model_index.json and component folders."""
    return root.is_dir() and (root / "model_index.json").exists()


def open_model(path: Any) -> ModelSource:
    """Opens the weights at `path` (file or directory) for streaming reads."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.name.endswith(".safetensors") or p.name.endswith(".index.json"):
            return SafeTensorsSource(p, p.parent)
        if p.suffix == ".parquet":
            return ParquetV1Source([p], p.parent)
        raise FormatError(f"{p}: unknown weight file type (expected .safetensors, "
                          ".safetensors.index.json or .parquet)")
    if is_v2_dir(p):
        return ParquetV2Source(p)
    if any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")):
        return SafeTensorsSource(p, p)  # the reader picks the index or the single file
    parquet = sorted(p.glob("*.parquet"))
    if parquet:
        return ParquetV1Source(parquet, p)
    hint = " (a diffusers pipeline: quantize it with arrowquant.quantize, component by component)" \
        if is_pipeline_dir(p) else ""
    raise ModelNotFoundError(f"{p}: no weights found (looked for *.safetensors, "
                             f"*.safetensors.index.json, *.parquet){hint}")
