"""Checks shared by the Parquet readers (V1 weights in, V2 models out):
column types, shapes, the sizes a row group can hold, and zero-copy views of
binary and list cells. Every failure is a FormatError / ShapeMismatchError
naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError, ShapeMismatchError

#: Largest element count a tensor may claim (int64 arithmetic stays exact below it).
MAX_NUMEL = 1 << 62
#: Most dimensions a tensor may have (what the writers accept and the readers read).
MAX_RANK = 32


# Column -> predicate on its Arrow type.
def is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def is_param_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and \
        t.value_type in (pa.float16(), pa.float32())


def is_blob(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def check_schema(f: Path, sch: pa.Schema, required: Mapping, optional: Mapping = {}) -> None:
    """FormatError naming the file and column when a column is missing or of the wrong type."""
    for name, ok in list(required.items()) + list(optional.items()):
        i = sch.get_field_index(name)
        if i < 0:
            if name in required:
                raise FormatError(f"{f}: missing column {name!r}")
            continue
        if not ok(sch.field(i).type):
            raise FormatError(f"{f}: column {name!r} has type {sch.field(i).type}, not the "
                              "type its format requires")


#: Largest single dimension (a larger one, even in a zero-element tensor, is no model).
MAX_DIM = 1 << 40


def check_tensor(where: str, name: Any, shape: Any) -> None:
    """The one rule of what a tensor may be called and how it may be shaped,
    applied by the writers (a source tensor, before any output exists) and
    the readers alike, so that whatever one accepts the other reads: a
    non-empty string name without NUL, at most MAX_RANK dims, each an
    integer in 0..MAX_DIM, at most MAX_NUMEL elements."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FormatError(f"{where}: tensor name {name!r} is empty or not text; every tensor "
                          "needs a non-empty name")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise ShapeMismatchError(f"{where}: tensor {name!r}: shape with "
                                 f"{len(shape) if isinstance(shape, (list, tuple)) else '?'} "
                                 f"dimensions; at most {MAX_RANK} are supported")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > MAX_DIM for d in shape):
        raise ShapeMismatchError(f"{where}: tensor {name!r}: shape {list(shape)} has a dimension "
                                 f"outside 0..2^40")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_NUMEL:
        raise ShapeMismatchError(f"{where}: tensor {name!r}: shape {list(shape)} has more than "
                                 "2^62 elements")


def check_shape(where: str, shape: Any, num_params: Any) -> Tuple[int, ...]:
    """A shape of non-negative dims whose product is num_params and stays far below 2^63."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or \
            any(not isinstance(d, int) or d < 0 or d > MAX_DIM for d in shape):
        raise ShapeMismatchError(f"{where}: invalid shape {shape!r}")
    n = 1
    for d in shape:
        n *= d
        if n > MAX_NUMEL:
            raise ShapeMismatchError(f"{where}: shape {list(shape)} has more than 2^62 elements")
    if n != num_params:
        raise ShapeMismatchError(f"{where}: shape {list(shape)} holds {n} elements, num_params "
                                 f"says {num_params}")
    return tuple(shape)


def data_column_bytes(f: Path, pf: pq.ParquetFile, rg: int, column: str = "data") -> int:
    """Decoded size of a row group's blob column from the footer (an upper bound
    of the blob bytes it holds): lets a reader reject a shape its file cannot
    hold before allocating anything for it."""
    try:
        md = pf.metadata.row_group(rg)
        for c in range(md.num_columns):
            col = md.column(c)
            if col.path_in_schema == column:
                return max(0, int(col.total_uncompressed_size))
    except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
        raise FormatError(f"{f}: row group {rg}: damaged footer ({type(exc).__name__}: "
                          f"{exc})") from None
    return 0


def check_row_group_holds(f: Path, pf: pq.ParquetFile, rg: int, rows: List[Dict[str, Any]],
                          need: int) -> None:
    """ShapeMismatchError when the data bytes the row group's shapes need
    exceed what its data column can hold (checked before reading any blob)."""
    have = data_column_bytes(f, pf, rg)
    if need > have:
        names = ", ".join(repr(r["layer_name"]) for r in rows)
        raise ShapeMismatchError(f"{f}: row group {rg} (tensor {names}) needs {need} data "
                                 f"bytes for the shapes it declares, its data column holds {have}")

def blob_view(arr: pa.Array, i: int) -> np.ndarray:
    """Bytes of element i of a (large_)binary array, without copying (empty
    for a null element; offsets outside the buffer are a FormatError)."""
    if arr.null_count and not arr[i].is_valid:
        return np.zeros(0, dtype=np.uint8)
    offsets_buf, data_buf = arr.buffers()[1], arr.buffers()[2]
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=off_type)
    j = arr.offset + i
    start, end = int(offsets[j]), int(offsets[j + 1])
    if data_buf is None:
        if end != start:
            raise FormatError(f"binary element {i}: {end - start} bytes without a data buffer")
        return np.zeros(0, dtype=np.uint8)
    if not 0 <= start <= end <= data_buf.size:
        raise FormatError(f"binary element {i}: offsets [{start}, {end}) outside its buffer")
    return np.frombuffer(data_buf, dtype=np.uint8, count=end - start, offset=start)


def list_values(col: pa.ChunkedArray, i: int) -> np.ndarray:
    """Values of list element i as float16/float32 (empty for null); null
    values inside the list become NaN (rejected by the caller's finite check)."""
    arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    if not arr[i].is_valid:
        return np.zeros(0, dtype=np.float32)
    values = arr[i].values
    if values is None or len(values) == 0:
        return np.zeros(0, dtype=np.float32)
    out = values.to_numpy(zero_copy_only=False)
    if out.dtype not in (np.float16, np.float32):
        raise FormatError(f"list element {i}: values of type {values.type}, expected float16/float32")
    return out
