"""ArrowQuant Parquet V2 (FORMAT.md section 5): the schema, its versions and
one row of it in memory (ChunkRecord). Files with two-level ("superblock")
parameters add three columns and say format version 2 (FORMAT.md section 9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import numpy as np
import pyarrow as pa

FORMAT_NAME = "arrowquant-parquet-v2"
#: metadata.json format of a quantized diffusers pipeline (one V2 directory per component).
PIPELINE_FORMAT = "arrowquant-parquet-v2-pipeline"
#: Version of files without two-level parameters; files with them say 2.
FORMAT_VERSION = 1
FORMAT_VERSION_SUPERBLOCK = 2
#: Files with code grids (FORMAT.md section 10: the code_levels column).
FORMAT_VERSION_GRID = 3
READABLE_VERSIONS = (1, 2, 3)
FILE_KV_METADATA = {b"arrowquant.format": b"parquet-v2", b"arrowquant.format_version": b"1"}
INDEX_NAME = "model.parquet.index.json"
BLOB_COLUMNS = ("data", "scales", "zero_points", "param_codes")
#: The columns of two-level parameters (FORMAT.md section 9), after the others.
SUPERBLOCK_COLUMNS = (("param_codes", pa.large_binary()), ("param_code_bits", pa.int64()),
                      ("superblock_groups", pa.int64()))
#: The table of a code grid (FORMAT.md 10.3), after the superblock columns.
GRID_COLUMN = ("code_levels", pa.list_(pa.float32()))
GRID_QUANT_TYPES = {"grid2": 2, "grid4": 4, "grid8": 8}


def format_version(superblock: bool, grid: bool = False) -> int:
    """The format version a file (or model directory) says: 3 when it holds
    a code grid, 2 when it holds two-level parameters, else 1 (readable by
    every V2 reader)."""
    if grid:
        return FORMAT_VERSION_GRID
    return FORMAT_VERSION_SUPERBLOCK if superblock else FORMAT_VERSION


def file_layout(param_dtypes: Any) -> Tuple[str, bool]:
    """(list value type, superblock columns) of a file holding tensors with
    these param dtypes: float32 lists when any tensor has float32 parameters
    (float16 values, a superblock's units included, are exact in them), else
    float16; the superblock columns when any tensor uses them."""
    kinds = set(param_dtypes)
    value_type = "float32" if "float32" in kinds or not kinds & {"float16", "superblock"} \
        else "float16"
    return value_type, "superblock" in kinds


def _layout_of(param_dtype: str, superblock: Optional[bool]) -> Tuple[str, bool]:
    if param_dtype == "superblock":
        return "float16", True
    return ("float16" if param_dtype == "float16" else "float32"), bool(superblock)


def schema(param_dtype: str = "float32", superblock: Optional[bool] = None,
           grid: bool = False) -> pa.Schema:
    """The V2 schema; `param_dtype` "float16" / "float32" is the list value
    type of scales and zero points, "superblock" means float16 lists plus the
    superblock columns (which `superblock=True` adds to float32 lists);
    `grid` adds the superblock columns and code_levels (format version 3)."""
    value_type, with_sb = _layout_of(param_dtype, superblock)
    with_sb = with_sb or grid
    param_type = pa.float16() if value_type == "float16" else pa.float32()
    fields = [
        ("layer_name", pa.string()),
        ("row_start", pa.int64()),
        ("row_count", pa.int64()),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("data", pa.large_binary()),
        ("num_params", pa.int64()),
        ("quant_type", pa.string()),
        ("scheme", pa.string()),
        ("method", pa.string()),
        ("group_size", pa.int64()),
        ("scales", pa.list_(param_type)),
        ("zero_points", pa.list_(param_type)),
        ("quant_axis", pa.int64()),
        ("is_diffusion_model", pa.bool_()),
        ("modality", pa.string()),
        ("time_aware_quant_json", pa.string()),
        ("spatial_quant_json", pa.string()),
        ("activation_stats_json", pa.string()),
    ]
    if with_sb:
        fields += list(SUPERBLOCK_COLUMNS)
    if grid:
        fields.append(GRID_COLUMN)
    version = str(format_version(with_sb, grid)).encode()
    return pa.schema(fields, metadata={**FILE_KV_METADATA, b"arrowquant.format_version": version})


@dataclass
class ChunkRecord:
    """One row of a V2 file: a range of rows of one tensor."""

    layer_name: str
    row_start: int
    row_count: int
    shape: Tuple[int, ...]
    dtype: str
    data: np.ndarray                  # uint8: packed codes, or raw source bytes for "none"
    num_params: int
    quant_type: str                   # int2 / int4 / int8 / none
    scheme: Optional[str] = None
    method: Optional[str] = None
    group_size: Optional[int] = None
    scales: Optional[np.ndarray] = None
    zero_points: Optional[np.ndarray] = None
    param_dtype: str = "float32"
    is_diffusion_model: bool = False
    modality: str = "unknown"
    time_aware_quant_json: Optional[str] = None
    spatial_quant_json: Optional[str] = None
    activation_stats_json: Optional[str] = None
    # param_dtype "superblock" (FORMAT.md section 9): `scales` / `zero_points`
    # then hold the super-block units d / dz (row_count * S, float16 values)
    # and these the packed (scale code, zero code) stream and its layout.
    param_codes: Optional[np.ndarray] = None
    param_code_bits: Optional[int] = None
    superblock_groups: Optional[int] = None
    # A code grid's table (FORMAT.md section 10; quant_type "grid<bits>").
    code_levels: Optional[np.ndarray] = None
    # In memory only (not a column): the expanded per-group (scales, zero
    # points) of a superblock chunk the pipeline just quantized.
    group_params: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)
    # In memory only: the pooled buffer the arrays above are views of (the
    # pipeline reuses it once the row is written).
    arena: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def stored_bytes(self) -> int:
        """Bytes this row stores for the tensor: data plus parameters at their
        storage size (4 or 2 bytes per value, superblock units 2 bytes each
        plus the packed codes)."""
        n = int(self.data.nbytes)
        if self.scales is None or self.quant_type == "none":
            return n
        values = int(np.asarray(self.scales).size + np.asarray(self.zero_points).size)
        if self.code_levels is not None:
            n += 4 * int(np.asarray(self.code_levels).size)
        if self.param_dtype == "superblock":
            return n + 2 * values + int(np.asarray(self.param_codes).size)
        return n + values * (2 if self.param_dtype == "float16" else 4)
