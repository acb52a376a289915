"""Parquet V1 weights (FORMAT.md section 4): one row per tensor, read one
row group at a time through pyarrow."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..jsonfile import MODEL_METADATA_SCHEMA, read_json
from ..errors import FormatError
from ..formats.arrow_checks import (blob_view, check_row_group_holds, check_schema, check_shape,
                                    is_blob, is_int, is_int_list, is_str)
from .base import ModelSource, TensorInfo, copy_into, rows_slice

#: dtypes Parquet V1 allows, with their sizes.
V1_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
            self.metadata = read_json(meta_path, MODEL_METADATA_SCHEMA)
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
        try:
            # No pre-buffering: it would hold a second copy of the row group.
            pf = pq.ParquetFile(str(f), pre_buffer=False)
            check_schema(f, pf.schema_arrow, {"layer_name": is_str, "shape": is_int_list,
                                              "dtype": is_str, "data": is_blob,
                                              "num_params": is_int})
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
                if dtype not in V1_DTYPES:
                    raise FormatError(f"{f}: tensor {name!r} has dtype {dtype!r}; Parquet V1 allows "
                                      "float32, float16, bfloat16")
                check_shape(f"{f}: tensor {name!r}", shape, n)
                self._where[name] = (f, rg, i)
                self.tensors.append(TensorInfo(name, tuple(shape), dtype, n * V1_DTYPES[dtype]))
                need += n * V1_DTYPES[dtype]
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
        try:
            return blob_view(self._cache, i)
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
        off, n = rows_slice(t, row_start, row_count)
        return copy_into(blob[off: off + n], out)

    def close(self) -> None:
        self._cache = None
        self._cache_key = None
        self._pf.clear()
