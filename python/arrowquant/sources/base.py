"""What every model reader offers: the tensors it holds (TensorInfo, before
any data is read) and raw bytes of row ranges of their 2-D views."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..engine.dtypes import ITEMSIZE, QUANTIZABLE_DTYPES
from ..errors import ModelNotFoundError
from ..files import check_inside
from ..spec import View2D


@dataclass(frozen=True)
class TensorInfo(View2D):
    """A tensor of a source model, before reading it."""

    name: str
    shape: Tuple[int, ...]
    dtype: str          # canonical name ("float16", "bfloat16", "int64", ...)
    nbytes: int         # bytes in the source

    @property
    def is_float(self) -> bool:
        return self.dtype in QUANTIZABLE_DTYPES


#: Files that hold weights (never copied to the output as "other files").
WEIGHT_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                   ".msgpack", ".onnx")


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
                out.append(check_inside(self.root, p, "file"))
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


def rows_slice(t: TensorInfo, row_start: int, row_count: Optional[int]) -> tuple:
    rows, cols = t.rows, t.cols
    if row_count is None:
        row_count = rows - row_start
    if row_start < 0 or row_count < 0 or row_start + row_count > rows:
        raise ValueError(f"rows [{row_start}, {row_start + row_count}) outside tensor {t.name!r} "
                         f"with {rows} rows")
    row_bytes = cols * ITEMSIZE[t.dtype] if t.numel else 0
    return row_start * row_bytes, row_count * row_bytes


def copy_into(view: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    if out is None:
        return view
    dst = out.reshape(-1).view(np.uint8)[: view.size]
    dst[...] = view
    return dst
