"""Model sources: find the weights in a path and read them tensor by tensor,
row range by row range, in bounded memory.

Formats: SafeTensors (one file, a sharded Hugging Face / diffusers model with
an index; read by the C++ reader), Parquet V1 (FORMAT.md section 4; one row
group at a time through pyarrow), and ArrowQuant Parquet V2 (dequantized on
read, for export and validation). A diffusers pipeline (model_index.json and
component folders) is a set of sources, one per component."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FormatError, ModelNotFoundError
from .base import WEIGHT_SUFFIXES, ModelSource, TensorInfo
from .parquet_v1 import ParquetV1Source
from .parquet_v2 import ParquetV2Source
from .safetensors import SafeTensorsModel, SafeTensorsSource
from ..files import check_inside


def is_v2_dir(root: Path) -> bool:
    meta = root / "metadata.json"
    if not meta.exists():
        return False
    try:
        doc = json.loads(meta.read_text())
    except (ValueError, OSError):
        return False  # not ours: the source readers say what is wrong with it
    # A quantized pipeline's top folder too: the V2 reader names its components.
    return isinstance(doc, dict) and doc.get("format") in ("arrowquant-parquet-v2",
                                                           "arrowquant-parquet-v2-pipeline")


def is_pipeline_dir(root: Path) -> bool:
    """A diffusers pipeline: model_index.json and component folders."""
    return root.is_dir() and (root / "model_index.json").exists()


def _inside(root: Path, files: Any) -> None:
    """The symlink rule (files.check_inside) on the weight files of a model
    folder, before any is opened: one leading out of the folder is refused,
    as index shards are."""
    for f in files:
        check_inside(root, Path(f), "weight file")


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
        _inside(p, [*p.glob("*.safetensors"), *p.glob("*.safetensors.index.json")])
        return SafeTensorsSource(p, p)  # the reader picks the index or the single file
    parquet = sorted(p.glob("*.parquet"))
    if parquet:
        _inside(p, parquet)
        return ParquetV1Source(parquet, p)
    hint = " (a diffusers pipeline: quantize it with arrowquant.quantize, component by component)" \
        if is_pipeline_dir(p) else ""
    raise ModelNotFoundError(f"{p}: no weights found (looked for *.safetensors, "
                             f"*.safetensors.index.json, *.parquet){hint}")


__all__ = ["open_model", "ModelSource", "TensorInfo", "WEIGHT_SUFFIXES", "SafeTensorsSource",
           "SafeTensorsModel", "ParquetV1Source", "ParquetV2Source", "is_v2_dir", "is_pipeline_dir"]
