"""An ArrowQuant Parquet V2 model read back as source tensors (dequantized
to float32), for GGUF export and validation."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..engine.dtypes import ITEMSIZE, readback_dtype
from ..formats.v2_reader import QuantizedModel
from .base import ModelSource, TensorInfo, copy_into, rows_slice


class ParquetV2Source(ModelSource):
    """An ArrowQuant V2 model read back as float32 (dequantized) tensors."""

    format = "arrowquant-parquet-v2"

    def __init__(self, root: Path):
        self.root = root
        self.model = QuantizedModel(root)
        self.metadata = dict(self.model.metadata)
        self.tensors = []
        for e in self.model.entries.values():
            dtype = readback_dtype(e.dtype) if e.quant_type == "none" else "float32"
            self.tensors.append(TensorInfo(e.name, e.shape, dtype,
                                           math.prod(e.shape) * ITEMSIZE[dtype]))
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
        rows_slice(t, row_start, row_count)  # range check
        row_bytes = t.cols * ITEMSIZE[t.dtype]
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
        return copy_into(view, out)

    def close(self) -> None:
        self._cache = None
        self.model.close()
