"""ArrowQuant Parquet V2 (FORMAT.md section 5): the schema, a writer of one
row per tensor chunk, and a lazy reader. Files with two-level ("superblock")
parameters add three columns and say format version 2 (FORMAT.md section 9)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import (ArrowQuantError, FormatError, MetadataError, ModelNotFoundError,
                     QuantizationError, ShapeMismatchError, ValidationError)
from .tensor import (QUANTIZABLE_DTYPES, ErrorSums, QuantizedTensor, expand_superblock,
                     groups_per_row, pack_param_codes, packed_row_bytes, param_code_bytes,
                     superblock_code_bits, superblock_groups, unpack_param_codes, view_2d)

FORMAT_NAME = "arrowquant-parquet-v2"
#: Version of files without two-level parameters; files with them say 2.
FORMAT_VERSION = 1
FORMAT_VERSION_SUPERBLOCK = 2
READABLE_VERSIONS = (1, 2)
FILE_KV_METADATA = {b"arrowquant.format": b"parquet-v2", b"arrowquant.format_version": b"1"}
INDEX_NAME = "model.parquet.index.json"
BLOB_COLUMNS = ("data", "scales", "zero_points", "param_codes")
#: The columns of two-level parameters (FORMAT.md section 9), after the others.
SUPERBLOCK_COLUMNS = (("param_codes", pa.large_binary()), ("param_code_bits", pa.int64()),
                      ("superblock_groups", pa.int64()))


def format_version(superblock: bool) -> int:
    """The format version a file (or model directory) says: 2 when it holds
    two-level parameters, else 1 (readable by every V2 reader)."""
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


def schema(param_dtype: str = "float32", superblock: Optional[bool] = None) -> pa.Schema:
    """The V2 schema; `param_dtype` "float16" / "float32" is the list value
    type of scales and zero points, "superblock" means float16 lists plus the
    superblock columns (which `superblock=True` adds to float32 lists)."""
    value_type, with_sb = _layout_of(param_dtype, superblock)
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
    version = str(format_version(with_sb)).encode()
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
    # In memory only (not a column): the expanded per-group (scales, zero
    # points) of a superblock chunk the pipeline just quantized.
    group_params: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    @property
    def stored_bytes(self) -> int:
        """Bytes this row stores for the tensor: data plus parameters at their
        storage size (4 or 2 bytes per value, superblock units 2 bytes each
        plus the packed codes)."""
        n = int(self.data.nbytes)
        if self.scales is None or self.quant_type == "none":
            return n
        values = int(np.asarray(self.scales).size + np.asarray(self.zero_points).size)
        if self.param_dtype == "superblock":
            return n + 2 * values + int(np.asarray(self.param_codes).size)
        return n + values * (2 if self.param_dtype == "float16" else 4)


def pack_codes(scale_codes: np.ndarray, zero_codes: np.ndarray, code_bits: int) -> np.ndarray:
    """The param_codes stream (FORMAT.md 9.3) of these codes: the same bytes as
    tensor.pack_param_codes, with direct paths for the widths the engine writes."""
    a = np.asarray(scale_codes, dtype=np.uint8).reshape(-1)
    c = np.asarray(zero_codes, dtype=np.uint8).reshape(-1)
    if code_bits == 4:
        return (a & 15) | ((c & 15) << 4)
    if code_bits == 8:
        return np.stack([a, c], axis=1).reshape(-1)
    if code_bits == 6:
        n = a.size
        if n % 2:
            a, c = np.append(a, np.uint8(0)), np.append(c, np.uint8(0))
        a32, c32 = a.astype(np.uint32) & 63, c.astype(np.uint32) & 63
        v = a32[0::2] | (c32[0::2] << 6) | (a32[1::2] << 12) | (c32[1::2] << 18)
        out = np.stack([v & 255, (v >> 8) & 255, v >> 16], axis=1).astype(np.uint8).reshape(-1)
        return out[:param_code_bytes(n, 6)]
    return pack_param_codes(a, c, code_bits)


def unpack_codes(stream: np.ndarray, groups: int, code_bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(scale codes, zero codes) of a param_codes stream; ValidationError for
    a wrong length or a non-zero padding bit (as tensor.unpack_param_codes)."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    need = param_code_bytes(groups, code_bits)
    if stream.size != need:
        raise ValidationError(f"param_codes holds {stream.size} bytes, {groups} groups of "
                              f"{code_bits}-bit codes need {need}")
    tail = (groups * 2 * code_bits) % 8
    if tail and int(stream[-1]) >> tail:
        raise ValidationError("param_codes: padding bits after the last code are not zero")
    if code_bits == 4:
        return stream & 15, stream >> 4
    if code_bits == 8:
        return stream[0::2].copy(), stream[1::2].copy()
    if code_bits == 6:
        pairs = -(-groups // 2)
        b = np.zeros(pairs * 3, dtype=np.uint32)
        b[:stream.size] = stream
        v = b[0::3] | (b[1::3] << 8) | (b[2::3] << 16)
        a = np.stack([v & 63, (v >> 12) & 63], axis=1).reshape(-1)[:groups].astype(np.uint8)
        c = np.stack([(v >> 6) & 63, (v >> 18) & 63], axis=1).reshape(-1)[:groups].astype(np.uint8)
        return a, c
    return unpack_param_codes(stream, groups, code_bits)


def _per_group(units: np.ndarray, rows: int, S: int, K: int, G: int) -> np.ndarray:
    """(rows, G): each group's super-block unit."""
    return np.repeat(units.reshape(rows, S), K, axis=1)[:, :G]


def superblock_params(name: str, rows: int, cols: int, bits: int, group_size: int,
                      scales: np.ndarray, zero_points: np.ndarray, sb_scales: np.ndarray,
                      sb_zero_points: np.ndarray) -> np.ndarray:
    """The param_codes stream of a chunk that the engine quantized with
    two-level parameters (expanded per-group `scales` / `zero_points` and the
    units). Checks that the units and the codes they imply are what the file
    can hold and expand back to exactly the parameters the codes were made
    with; anything else is an engine fault (QuantizationError), never written."""
    G = groups_per_row(cols, group_size)
    K = superblock_groups(group_size)
    S = -(-G // K)
    p = superblock_code_bits(bits)
    top = (1 << p) - 1
    where = f"tensor {name!r}"
    s = np.asarray(scales, dtype=np.float32).reshape(rows, G)
    z = np.asarray(zero_points, dtype=np.float32).reshape(rows, G)
    d = np.asarray(sb_scales, dtype=np.float32).reshape(-1)
    dz = np.asarray(sb_zero_points, dtype=np.float32).reshape(-1)
    if d.size != rows * S or dz.size != rows * S:
        raise QuantizationError(f"{where}: superblock units of {d.size} and {dz.size} values, "
                                f"{rows} rows x {S} super-blocks expected")
    if not (np.isfinite(d).all() and (d > 0).all() and np.isfinite(dz).all() and (dz >= 0).all()):
        raise QuantizationError(f"{where}: superblock units must be finite, scale units > 0 and "
                                "zero units >= 0")
    if not (np.array_equal(d.astype(np.float16).astype(np.float32), d)
            and np.array_equal(dz.astype(np.float16).astype(np.float32), dz)):
        raise QuantizationError(f"{where}: superblock units are not float16 values")
    dg = _per_group(d, rows, S, K, G)
    dzg = _per_group(dz, rows, S, K, G)
    a = np.rint(s / dg)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dzg > 0, np.rint(z / dzg), np.float32(0))
    if not (np.isfinite(a).all() and np.isfinite(c).all() and a.min(initial=1) >= 1
            and a.max(initial=1) <= top and c.min(initial=0) >= 0 and c.max(initial=0) <= top):
        raise QuantizationError(f"{where}: superblock codes outside [1, {top}] / [0, {top}]")
    # The expansion must give the engine's values (a zero point of -0 and one
    # of +0 dequantize alike, so values, not bits, are compared).
    if not (np.array_equal(dg * a.astype(np.float32), s)
            and np.array_equal(dzg * c.astype(np.float32), z)):
        raise QuantizationError(f"{where}: superblock parameters do not expand to the scales and "
                                "zero points the codes were made with")
    return pack_codes(a.astype(np.uint8), c.astype(np.uint8), p)


def _binary_array(buf: np.ndarray) -> pa.Array:
    """A one-element large_binary array over `buf` without copying it."""
    data = pa.py_buffer(np.ascontiguousarray(buf, dtype=np.uint8))
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])


def _list_array(values: Optional[np.ndarray], value_type: pa.DataType) -> pa.Array:
    np_type = np.float16 if value_type == pa.float16() else np.float32
    flat = np.zeros(0, dtype=np_type) if values is None else np.asarray(values).astype(np_type, copy=False)
    offsets = pa.array(np.array([0, flat.size], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=value_type))


def record_batch(rec: ChunkRecord, param_dtype: Optional[str] = None,
                 superblock: Optional[bool] = None) -> pa.RecordBatch:
    """The V2 row of one chunk, its blobs wrapped without copies. `param_dtype`
    and `superblock` are the file's layout (schema(); default: the chunk's own)."""
    sch = schema(param_dtype or rec.param_dtype, superblock)
    quantized = rec.quant_type != "none"
    sb_row = quantized and rec.param_dtype == "superblock"
    if sb_row and "param_codes" not in sch.names:
        raise ValueError(f"tensor {rec.layer_name!r}: superblock parameters need a file with "
                         "the superblock columns")
    cols = [
        pa.array([rec.layer_name], pa.string()),
        pa.array([rec.row_start], pa.int64()),
        pa.array([rec.row_count], pa.int64()),
        pa.array([list(rec.shape)], pa.list_(pa.int64())),
        pa.array([rec.dtype], pa.string()),
        _binary_array(rec.data),
        pa.array([rec.num_params], pa.int64()),
        pa.array([rec.quant_type], pa.string()),
        pa.array([rec.scheme if quantized else None], pa.string()),
        pa.array([rec.method if quantized else None], pa.string()),
        pa.array([rec.group_size if quantized else None], pa.int64()),
        # A superblock row stores its scale units then its zero units in
        # `scales` and leaves `zero_points` empty (FORMAT.md 9.2), so a
        # reader that predates the format finds no zero point for any group
        # and refuses the row instead of misreading units as parameters.
        _list_array(np.concatenate([np.asarray(rec.scales).reshape(-1),
                                    np.asarray(rec.zero_points).reshape(-1)]) if sb_row
                    else rec.scales, sch.field("scales").type.value_type),
        _list_array(np.zeros(0, np.float32) if sb_row else rec.zero_points,
                    sch.field("zero_points").type.value_type),
        pa.array([1 if quantized else None], pa.int64()),
        pa.array([rec.is_diffusion_model], pa.bool_()),
        pa.array([rec.modality], pa.string()),
        pa.array([rec.time_aware_quant_json], pa.string()),
        pa.array([rec.spatial_quant_json], pa.string()),
        pa.array([rec.activation_stats_json], pa.string()),
    ]
    if "param_codes" in sch.names:
        if sb_row:
            cols += [_binary_array(rec.param_codes), pa.array([rec.param_code_bits], pa.int64()),
                     pa.array([rec.superblock_groups], pa.int64())]
        else:
            cols += [pa.nulls(1, pa.large_binary()), pa.nulls(1, pa.int64()),
                     pa.nulls(1, pa.int64())]
    return pa.RecordBatch.from_arrays(cols, schema=sch)


def open_writer(path: Path, param_dtype: str = "float32",
                extra_metadata: Optional[Dict[bytes, bytes]] = None,
                superblock: Optional[bool] = None) -> pq.ParquetWriter:
    """A Parquet writer for V2 rows: no compression or statistics on the blob
    columns (packed codes do not compress; huge min/max values break readers)."""
    sch = schema(param_dtype, superblock)
    if extra_metadata:
        sch = sch.with_metadata({**sch.metadata, **extra_metadata})
    stats_cols = [f.name for f in sch if f.name not in BLOB_COLUMNS]
    return pq.ParquetWriter(
        str(path), sch,
        compression={name: ("none" if name in BLOB_COLUMNS else "snappy") for name in sch.names},
        write_statistics=stats_cols,
        use_dictionary=False,
        data_page_size=64 * 1024 * 1024,
    )


def write_row(writer: pq.ParquetWriter, batch: pa.RecordBatch) -> None:
    """Each chunk is its own row group, so readers can stream one at a time."""
    writer.write_batch(batch, row_group_size=1)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ChunkLocation:
    file: Path
    row_group: int
    row_start: int
    row_count: int


@dataclass
class TensorEntry:
    """What a V2 directory says of one tensor (without its data)."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    num_params: int
    quant_type: str
    scheme: Optional[str]
    method: Optional[str]
    group_size: Optional[int]
    chunks: List[ChunkLocation]
    data_bytes: int = 0
    spatial_quant_json: Optional[str] = None
    param_dtype: Optional[str] = None       # float32 / float16 / superblock (None: "none")
    param_code_bits: Optional[int] = None   # superblock only: p
    superblock_groups: Optional[int] = None  # superblock only: K

    @property
    def bits(self) -> Optional[int]:
        return None if self.quant_type == "none" else int(self.quant_type[3:])


def _inside(root: Path, p: Path) -> bool:
    """Whether `p`, symlinks resolved, lies inside `root`."""
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def read_index(root: Path) -> Optional[Dict[str, str]]:
    """The weight map of a sharded V2 directory (tensor -> file name), checked:
    names are strings and every file stays inside the directory."""
    index = root / INDEX_NAME
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise FormatError(f"{index}: not a valid V2 index ({exc})") from None
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"{index}: tensor {tensor!r} maps to {name!r}, not a file name")
        if Path(name).is_absolute() or ".." in Path(name).parts or not _inside(root, root / name):
            raise FormatError(f"{index}: file {name!r} (tensor {tensor!r}) points outside the "
                              "model directory")
    return weight_map


def model_files(root: Path) -> List[Path]:
    """The Parquet files of a V2 directory, in order."""
    weight_map = read_index(root)
    if weight_map is not None:
        files = []
        for name in sorted(set(weight_map.values())):
            p = root / name
            if not p.is_file():
                raise ModelNotFoundError(f"{root / INDEX_NAME}: names {name!r}, which does not exist")
            files.append(p)
        return files
    single = root / "model.parquet"
    if single.exists():
        if not _inside(root, single):
            raise FormatError(f"{single}: a symlink that points outside the model directory")
        return [single]
    raise ModelNotFoundError(f"{root}: no model.parquet or {INDEX_NAME}: not an ArrowQuant V2 model")


def read_metadata(path: Path) -> Dict[str, Any]:
    """metadata.json as a dict ({} when absent); MetadataError when unusable."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise MetadataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise MetadataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


#: Column -> predicate on its Arrow type (FORMAT.md section 5).
def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _is_param_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and \
        t.value_type in (pa.float16(), pa.float32())


def _is_blob(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


V2_COLUMNS = {
    "layer_name": _is_str, "row_start": _is_int, "row_count": _is_int, "shape": _is_int_list,
    "dtype": _is_str, "data": _is_blob, "num_params": _is_int, "quant_type": _is_str,
    "scheme": _is_str, "method": _is_str, "group_size": _is_int, "scales": _is_param_list,
    "zero_points": _is_param_list,
}
OPTIONAL_COLUMNS = {"spatial_quant_json": _is_str, "param_codes": _is_blob,
                    "param_code_bits": _is_int, "superblock_groups": _is_int}
#: Largest param_code_bits (codes are at most one byte).
MAX_CODE_BITS = 8
_ITEMSIZE = {**QUANTIZABLE_DTYPES, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}
QUANT_TYPES = {"int2": 2, "int4": 4, "int8": 8, "none": None}
#: Largest element count a tensor may claim (int64 arithmetic stays exact below it).
MAX_NUMEL = 1 << 62
MAX_RANK = 32


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


def check_shape(where: str, shape: Any, num_params: Any) -> Tuple[int, ...]:
    """A shape of non-negative dims whose product is num_params and stays far below 2^63."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or \
            any(not isinstance(d, int) or d < 0 for d in shape):
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


class QuantizedModel(Mapping):
    """A V2 directory opened lazily: a Mapping of tensor name -> dequantized
    float32 array (read and dequantized on access, one tensor at a time)."""

    def __init__(self, path: Any, engine: str = "native"):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ModelNotFoundError(f"{self.root}: not a directory")
        self.engine = engine
        self.metadata: Dict[str, Any] = read_metadata(self.root / "metadata.json")
        self.weight_map = read_index(self.root)
        self.files = model_files(self.root)
        self.entries: Dict[str, TensorEntry] = {}
        self._files: Dict[Path, pq.ParquetFile] = {}
        for f in self.files:
            self._index_file(f)
        for entry in self.entries.values():
            _check_coverage(entry)
        if self.weight_map is not None:
            for name, fname in self.weight_map.items():
                entry = self.entries.get(name)
                if entry is None:
                    raise FormatError(f"{self.root / INDEX_NAME}: tensor {name!r} is in no file")
                if any(c.file != self.root / fname for c in entry.chunks):
                    raise FormatError(f"{self.root / INDEX_NAME}: tensor {name!r} maps to "
                                      f"{fname!r} but is stored elsewhere")

    def _parquet(self, f: Path) -> pq.ParquetFile:
        if f not in self._files:
            self._files[f] = pq.ParquetFile(str(f))
        return self._files[f]

    def _index_file(self, f: Path) -> None:
        try:
            pf = self._parquet(f)
            kv = pf.schema_arrow.metadata or {}
            if kv.get(b"arrowquant.format") != b"parquet-v2":
                raise FormatError(f"{f}: missing arrowquant.format = parquet-v2 metadata")
            check_version(f, kv.get(b"arrowquant.format_version"))
            check_schema(f, pf.schema_arrow, V2_COLUMNS, OPTIONAL_COLUMNS)
            names = pf.schema_arrow.names
            sb_cols = [c for c, _ in SUPERBLOCK_COLUMNS]
            present = [c for c in sb_cols if c in names]
            if present and len(present) != len(sb_cols):
                missing = sorted(set(sb_cols) - set(present))
                raise FormatError(f"{f}: has superblock column(s) {present} without {missing}")
            list_type = pf.schema_arrow.field("scales").type.value_type
            self._list_dtype = "float16" if list_type == pa.float16() else "float32"
            cols = ["layer_name", "row_start", "row_count", "shape", "dtype", "num_params",
                    "quant_type", "scheme", "method", "group_size"]
            cols += [c for c in ("spatial_quant_json", "param_code_bits", "superblock_groups")
                     if c in names]
            for rg in range(pf.num_row_groups):
                rows = pf.read_row_group(rg, columns=cols).to_pylist()
                need = 0
                for i, row in enumerate(rows):
                    need += self._add_chunk(f, rg, i, row)
                check_row_group_holds(f, pf, rg, rows, need)
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, ArrowQuantError):
                raise
            raise FormatError(f"{f}: cannot read as ArrowQuant Parquet V2 "
                              f"({type(exc).__name__}: {exc})") from None

    def _add_chunk(self, f: Path, rg: int, i: int, row: Dict[str, Any]) -> int:
        """Checks one row against FORMAT.md section 5 and records it; returns
        the data bytes the row must hold."""
        name = row["layer_name"]
        if not isinstance(name, str) or not name:
            raise FormatError(f"{f}: row {i} of row group {rg} has no layer_name")
        where = f"{f}: tensor {name!r} (row group {rg})"
        for key in ("row_start", "row_count", "shape", "dtype", "num_params", "quant_type"):
            if row[key] is None:
                raise FormatError(f"{where}: {key} is null")
        qt = row["quant_type"]
        if qt not in QUANT_TYPES:
            raise FormatError(f"{where}: quant_type {qt!r} is not one of int2, int4, int8, none")
        dtype = row["dtype"]
        if dtype not in _ITEMSIZE:
            raise FormatError(f"{where}: unknown dtype {dtype!r}")
        shape = check_shape(where, row["shape"], row["num_params"])
        rows, cols = view_2d(shape)
        bits = QUANT_TYPES[qt]
        group_size = row["group_size"]
        spatial = row.get("spatial_quant_json")
        p, K = row.get("param_code_bits"), row.get("superblock_groups")
        if bits is not None:
            if not isinstance(group_size, int) or group_size <= 0:
                raise FormatError(f"{where}: group_size {group_size!r} must be a positive integer")
            if row["scheme"] not in (None, "asymmetric", "symmetric"):
                raise FormatError(f"{where}: unknown scheme {row['scheme']!r}")
            if spatial:
                _equalization_scales(where, spatial, cols)
            check_superblock_layout(where, p, K)
        elif p is not None or K is not None:
            raise FormatError(f"{where}: an unquantized tensor with superblock parameters")
        param_dtype = None if bits is None else "superblock" if p is not None else self._list_dtype
        entry = self.entries.get(name)
        if entry is None:
            entry = TensorEntry(
                name=name, shape=shape, dtype=dtype, num_params=row["num_params"],
                quant_type=qt, scheme=row["scheme"], method=row["method"],
                group_size=group_size if bits is not None else None,
                chunks=[], spatial_quant_json=spatial, param_dtype=param_dtype,
                param_code_bits=p, superblock_groups=K,
            )
            self.entries[name] = entry
        else:
            mine = (shape, dtype, qt, group_size if bits is not None else None, row["scheme"],
                    spatial, param_dtype, p, K)
            theirs = (entry.shape, entry.dtype, entry.quant_type, entry.group_size, entry.scheme,
                      entry.spatial_quant_json, entry.param_dtype, entry.param_code_bits,
                      entry.superblock_groups)
            if mine != theirs:
                raise FormatError(f"{where}: chunk disagrees with an earlier chunk of the same "
                                  f"tensor (shape/dtype/quant_type/group_size/scheme/equalization/"
                                  f"parameters {mine[:5] + mine[6:]} vs "
                                  f"{theirs[:5] + theirs[6:]})")
        start, count = row["row_start"], row["row_count"]
        if start < 0 or count < 0 or start + count > rows:
            raise ShapeMismatchError(f"{where}: rows [{start}, {start + count}) outside the "
                                     f"{rows} rows of shape {list(shape)}")
        entry.chunks.append(ChunkLocation(f, rg, start, count))
        return count * _row_bytes(entry)

    # Mapping interface -------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        return self.dequantize(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def info(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise ModelNotFoundError(f"{self.root}: no tensor named {name!r}") from None

    def _chunk_rows(self, entry: TensorEntry,
                    only: Optional[Sequence[ChunkLocation]] = None) -> Iterator[Dict[str, Any]]:
        """The chunks' blobs and parameters, each checked against the sizes its
        row declares (a file changed or damaged since it was opened is an error)."""
        cols = ["row_start", "row_count", "data", "scales", "zero_points", "layer_name"]
        sb = entry.param_dtype == "superblock"
        rows, n_cols = view_2d(entry.shape)
        bits = entry.bits
        for loc in sorted(only if only is not None else entry.chunks, key=lambda c: c.row_start):
            where = f"{loc.file}: tensor {entry.name!r} rows [{loc.row_start}, " \
                    f"{loc.row_start + loc.row_count})"
            part = None
            try:
                pf = self._parquet(loc.file)
                has_codes = "param_codes" in pf.schema_arrow.names
                table = pf.read_row_group(loc.row_group,
                                          columns=cols + (["param_codes"] if has_codes else []))
                names = table.column("layer_name").to_pylist()
                starts = table.column("row_start").to_pylist()
                for i in range(table.num_rows):
                    if names[i] != entry.name or starts[i] != loc.row_start:
                        continue
                    data_col = table.column("data")
                    data_arr = data_col.chunk(0) if data_col.num_chunks == 1 \
                        else pa.concat_arrays(data_col.chunks)
                    part = {
                        "row_start": loc.row_start,
                        "row_count": loc.row_count,
                        "data": _blob_view(data_arr, i),
                        "scales": _list_values(table.column("scales"), i),
                        "zero_points": _list_values(table.column("zero_points"), i),
                    }
                    if has_codes:
                        codes_col = table.column("param_codes")
                        codes_arr = codes_col.chunk(0) if codes_col.num_chunks == 1 \
                            else pa.concat_arrays(codes_col.chunks)
                        part["param_codes"] = None if not codes_arr[i].is_valid \
                            else _blob_view(codes_arr, i)
                    break
            except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
                raise FormatError(f"{where}: cannot read ({type(exc).__name__}: {exc})") from None
            if part is None:
                raise FormatError(f"{where}: chunk not found (the file changed since it was opened)")
            want = loc.row_count * _row_bytes(entry)
            if part["data"].size != want:
                raise ShapeMismatchError(f"{where}: {part['data'].size} data bytes, expected {want}")
            if not sb and part.pop("param_codes", None) is not None:
                raise FormatError(f"{where}: param_codes set in a row without param_code_bits")
            if sb:
                units, empty = part.pop("scales"), part.pop("zero_points")
                G = groups_per_row(n_cols, entry.group_size)
                S = -(-G // entry.superblock_groups)
                if empty.size != 0:
                    raise ShapeMismatchError(f"{where}: {empty.size} zero_points in a superblock "
                                             "row (its units are all in scales; zero_points is "
                                             "empty)")
                if units.size != 2 * loc.row_count * S:
                    raise ShapeMismatchError(f"{where}: {units.size} scales (superblock units), "
                                             f"expected 2 x {loc.row_count} rows x {S} "
                                             "super-blocks")
                half = loc.row_count * S
                part.update(expand_chunk(where, units[:half], units[half:],
                                         part.pop("param_codes"), entry.param_code_bits,
                                         entry.superblock_groups, loc.row_count, G))
            elif bits is not None:
                n_params = loc.row_count * groups_per_row(n_cols, entry.group_size)
                for key in ("scales", "zero_points"):
                    v = part[key]
                    if v.size != n_params:
                        raise ShapeMismatchError(f"{where}: {v.size} {key}, expected "
                                                 f"{loc.row_count} rows x "
                                                 f"{groups_per_row(n_cols, entry.group_size)} groups")
                    if not np.isfinite(v).all():
                        bad = int(np.flatnonzero(~np.isfinite(v))[0])
                        raise ValidationError(f"{where}: {key}[{bad}] is {v[bad]} (not finite)")
            yield part

    def dequantize_chunk(self, name: str, loc: ChunkLocation) -> np.ndarray:
        """One chunk's rows as a (row_count, cols) array: float32 for quantized
        tensors (equalization undone), the original dtype otherwise."""
        from . import engine

        entry = self.info(name)
        rows, cols = view_2d(entry.shape)
        part = next(self._chunk_rows(entry, [loc]))
        if entry.quant_type == "none":
            return _raw_to_array(part["data"], entry.dtype, (loc.row_count, cols))
        qt = QuantizedTensor(
            data=part["data"], scales=part["scales"].astype(np.float32),
            zero_points=part["zero_points"].astype(np.float32), shape=(loc.row_count, cols),
            dtype=entry.dtype, bits=entry.bits, group_size=entry.group_size, name=name)
        values = engine.dequantize_array(qt).reshape(loc.row_count, cols)
        s = self._equalization(entry)
        return values / s[None, :] if s is not None else values

    def _equalization(self, entry: TensorEntry) -> Optional[np.ndarray]:
        if not entry.spatial_quant_json:
            return None
        s = _equalization_scales(f"{self.root}: tensor {entry.name!r}", entry.spatial_quant_json,
                                 view_2d(entry.shape)[1])
        return s if s.size else None

    def raw(self, name: str) -> QuantizedTensor:
        """Packed codes and parameters of a quantized tensor (chunks joined)."""
        entry = self.info(name)
        if entry.quant_type == "none":
            raise FormatError(f"{self.root}: tensor {name!r} is stored unquantized; use "
                              f"model[{name!r}]")
        parts = list(self._chunk_rows(entry))
        if not parts:
            raise FormatError(f"{self.root}: tensor {name!r} has no chunks")
        fields = dict(
            data=np.concatenate([p["data"] for p in parts]) if len(parts) > 1 else parts[0]["data"],
            scales=np.concatenate([p["scales"].astype(np.float32) for p in parts]),
            zero_points=np.concatenate([p["zero_points"].astype(np.float32) for p in parts]),
            shape=entry.shape, dtype=entry.dtype, bits=entry.bits, group_size=entry.group_size,
            scheme=entry.scheme or "asymmetric", method=entry.method or "rtn",
            param_dtype=entry.param_dtype or "float32", name=name,
        )
        if entry.param_dtype != "superblock":
            return QuantizedTensor(**fields)
        fields["superblock_scales"] = np.concatenate([p["sb_scales"] for p in parts])
        fields["superblock_zero_points"] = np.concatenate([p["sb_zero_points"] for p in parts])
        if entry.param_code_bits == superblock_code_bits(entry.bits) and \
                entry.superblock_groups == superblock_groups(entry.group_size):
            return QuantizedTensor(**fields)
        # A layout other than the engine's (readers take what the file says).
        return StoredSuperblockTensor(**fields, stored_code_bits=entry.param_code_bits,
                                      stored_superblock_groups=entry.superblock_groups)

    def dequantize(self, name: str, out_dtype: Any = None) -> np.ndarray:
        """A quantized tensor as float32, an unquantized one with its original
        dtype (or either as `out_dtype`), with channel equalization undone."""
        from . import engine

        entry = self.info(name)
        if entry.quant_type == "none":
            parts = list(self._chunk_rows(entry))
            if not parts:
                raise FormatError(f"{self.root}: tensor {name!r} has no chunks")
            raw = np.concatenate([p["data"] for p in parts]) if len(parts) > 1 else parts[0]["data"]
            values = _raw_to_array(raw, entry.dtype, entry.shape)
            return values if out_dtype is None else values.astype(out_dtype, copy=False)
        values = engine.dequantize_array(self.raw(name))
        s = self._equalization(entry)
        if s is not None:
            rows, cols = view_2d(entry.shape)
            values = (values.reshape(rows, cols) / s[None, :]).reshape(entry.shape)
        return values if out_dtype is None else values.astype(out_dtype, copy=False)

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "QuantizedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class StoredSuperblockTensor(QuantizedTensor):
    """A superblock tensor read from a file whose code bits or groups per
    super-block differ from what the engine writes for its bits and group size."""

    stored_code_bits: int = 0
    stored_superblock_groups: int = 1

    @property
    def param_code_bits(self) -> int:  # type: ignore[override]
        return self.stored_code_bits

    @property
    def superblock_groups(self) -> int:  # type: ignore[override]
        return self.stored_superblock_groups


def check_version(f: Path, value: Optional[bytes]) -> int:
    """The file's arrowquant.format_version (absent: 1); FormatError for a
    version this reader does not know (a newer writer's file)."""
    if value is None:
        return FORMAT_VERSION
    try:
        version = int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{f}: arrowquant.format_version {value!r} is not a number") from None
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{f}: ArrowQuant Parquet V2 format version {version}; this reader "
                          f"reads versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade "
                          "arrowquant to read it)")
    return version


def check_superblock_layout(where: str, p: Any, K: Any) -> None:
    """param_code_bits and superblock_groups: both null, or p in 1..8 and K >= 1."""
    if p is None and K is None:
        return
    if p is None or K is None:
        raise FormatError(f"{where}: param_code_bits {p!r} and superblock_groups {K!r}: one is "
                          "null, the other not")
    if not isinstance(p, int) or not 1 <= p <= MAX_CODE_BITS:
        raise FormatError(f"{where}: param_code_bits {p!r} outside 1..{MAX_CODE_BITS}")
    if not isinstance(K, int) or K < 1 or K > MAX_NUMEL:
        raise FormatError(f"{where}: superblock_groups {K!r} must be a positive integer")


def expand_chunk(where: str, d: np.ndarray, dz: np.ndarray, codes: Optional[np.ndarray], p: int,
                 K: int, row_count: int, G: int) -> Dict[str, np.ndarray]:
    """Per-group float32 parameters of a superblock chunk (FORMAT.md section
    9), every stored value checked: unit and code counts, finite float16
    units with d > 0 and dz >= 0, scale codes >= 1, zero padding bits."""
    S = -(-G // K)
    if codes is None:
        raise FormatError(f"{where}: param_codes is null in a superblock row")
    for label, v in (("scale", d), ("zero", dz)):
        if v.size != row_count * S:
            raise ShapeMismatchError(f"{where}: {v.size} superblock {label} units, expected "
                                     f"{row_count} rows x {S} super-blocks")
    need = param_code_bytes(row_count * G, p)
    if codes.size != need:
        raise ShapeMismatchError(f"{where}: param_codes holds {codes.size} bytes, {row_count} rows "
                                 f"x {G} groups of {p}-bit code pairs need {need}")
    units = []
    for label, stored in (("scale", d), ("zero", dz)):
        v = stored.astype(np.float32)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v <= 0 if label == "scale" else v < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            rule = "finite and > 0" if label == "scale" else "finite and >= 0"
            raise ValidationError(f"{where}: superblock {label} unit {i} is {v[i]} (must be {rule})")
        if stored.dtype != np.float16:
            with np.errstate(over="ignore"):
                off = v.astype(np.float16).astype(np.float32) != v
            if off.any():
                i = int(np.flatnonzero(off)[0])
                raise ValidationError(f"{where}: superblock {label} unit {i} = {v[i]!r} is not a "
                                      "float16 value")
        units.append(v)
    d32, dz32 = units
    try:
        a, c = unpack_codes(codes, row_count * G, p)
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc}") from None
    if a.size and int(a.min()) < 1:
        i = int(np.flatnonzero(a == 0)[0])
        raise ValidationError(f"{where}: scale code of group {i} is 0 (scale codes are >= 1)")
    scales, zeros = expand_superblock(d32, dz32, a, c, row_count, G, K)
    return {"scales": scales, "zero_points": zeros, "sb_scales": d32, "sb_zero_points": dz32}


def _blob_view(arr: pa.Array, i: int) -> np.ndarray:
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


def _list_values(col: pa.ChunkedArray, i: int) -> np.ndarray:
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


def _row_bytes(entry: TensorEntry) -> int:
    """Bytes one row of the 2-D view takes in the data column."""
    _, cols = view_2d(entry.shape)
    if entry.bits is None:
        return cols * _ITEMSIZE[entry.dtype]
    return packed_row_bytes(cols, entry.bits)


def _equalization_scales(where: str, text: str, cols: int) -> np.ndarray:
    """The `scales` of a spatial_quant_json (FORMAT.md 8.2): C finite, positive values."""
    try:
        spec = json.loads(text)
        s = np.asarray(spec.get("scales", []) if isinstance(spec, dict) else None,
                       dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{where}: spatial_quant_json unusable ({exc})") from None
    if s.ndim != 1 or (s.size and s.size != cols):
        raise ShapeMismatchError(f"{where}: spatial_quant_json has {s.size} scales for {cols} "
                                 "columns")
    if s.size and not (np.isfinite(s).all() and (s > 0).all()):
        raise ValidationError(f"{where}: spatial_quant_json scales must be finite and positive")
    return s


def _check_coverage(entry: TensorEntry) -> None:
    """Chunks cover rows 0..R of the 2-D view once each, in order, with no gap or overlap."""
    rows, _ = view_2d(entry.shape)
    expect = 0
    for c in sorted(entry.chunks, key=lambda c: (c.row_start, c.row_count)):
        if c.row_start != expect:
            kind = "overlap" if c.row_start < expect else "gap"
            raise FormatError(f"{c.file}: tensor {entry.name!r}: chunks {kind} (expected row "
                              f"{expect}, found a chunk starting at row {c.row_start})")
        if c.row_count == 0 and rows != 0:
            raise FormatError(f"{c.file}: tensor {entry.name!r}: empty chunk at row {c.row_start}")
        expect += c.row_count
    if expect != rows:
        raise FormatError(f"{entry.chunks[0].file}: tensor {entry.name!r}: chunks cover "
                          f"{expect} of {rows} rows")


#: Unquantized dtypes numpy holds natively; bfloat16 / float8 read back as float32 (exact).
NATIVE_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16,
                 "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
                 "uint8": np.uint8, "bool": np.bool_}


def readback_dtype(dtype: str) -> str:
    """The dtype an unquantized tensor of `dtype` is read back as."""
    return dtype if dtype in NATIVE_DTYPES else "float32"


def _raw_to_array(raw: np.ndarray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    from .reference import to_float32

    if dtype in NATIVE_DTYPES:
        return raw.view(NATIVE_DTYPES[dtype]).reshape(shape)
    return to_float32(raw, dtype).reshape(shape)


def load(path: Any) -> QuantizedModel:
    """Opens an ArrowQuant Parquet V2 directory lazily."""
    return QuantizedModel(path)
