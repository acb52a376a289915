"""ArrowQuant Parquet V2 (FORMAT.md section 5): the schema, a writer of one
row per tensor chunk, and a lazy reader."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArrowQuantError, FormatError, MetadataError, ModelNotFoundError, ShapeMismatchError, ValidationError
from .tensor import QUANTIZABLE_DTYPES, ErrorSums, QuantizedTensor, groups_per_row, packed_row_bytes, view_2d

FORMAT_NAME = "arrowquant-parquet-v2"
FORMAT_VERSION = 1
FILE_KV_METADATA = {b"arrowquant.format": b"parquet-v2", b"arrowquant.format_version": b"1"}
INDEX_NAME = "model.parquet.index.json"
BLOB_COLUMNS = ("data", "scales", "zero_points")


def schema(param_dtype: str = "float32") -> pa.Schema:
    param_type = pa.float16() if param_dtype == "float16" else pa.float32()
    return pa.schema(
        [
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
        ],
        metadata=FILE_KV_METADATA,
    )


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


def record_batch(rec: ChunkRecord, param_dtype: Optional[str] = None) -> pa.RecordBatch:
    """The V2 row of one chunk, its blobs wrapped without copies. `param_dtype`
    is the file's parameter type (default: the chunk's own)."""
    sch = schema(param_dtype or rec.param_dtype)
    quantized = rec.quant_type != "none"
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
        _list_array(rec.scales, sch.field("scales").type.value_type),
        _list_array(rec.zero_points, sch.field("zero_points").type.value_type),
        pa.array([1 if quantized else None], pa.int64()),
        pa.array([rec.is_diffusion_model], pa.bool_()),
        pa.array([rec.modality], pa.string()),
        pa.array([rec.time_aware_quant_json], pa.string()),
        pa.array([rec.spatial_quant_json], pa.string()),
        pa.array([rec.activation_stats_json], pa.string()),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=sch)


def open_writer(path: Path, param_dtype: str = "float32",
                extra_metadata: Optional[Dict[bytes, bytes]] = None) -> pq.ParquetWriter:
    """A Parquet writer for V2 rows: no compression or statistics on the blob
    columns (packed codes do not compress; huge min/max values break readers)."""
    sch = schema(param_dtype)
    if extra_metadata:
        sch = sch.with_metadata({**FILE_KV_METADATA, **extra_metadata})
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
OPTIONAL_COLUMNS = {"spatial_quant_json": _is_str}
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
            check_schema(f, pf.schema_arrow, V2_COLUMNS, OPTIONAL_COLUMNS)
            cols = ["layer_name", "row_start", "row_count", "shape", "dtype", "num_params",
                    "quant_type", "scheme", "method", "group_size"]
            if "spatial_quant_json" in pf.schema_arrow.names:
                cols.append("spatial_quant_json")
            for rg in range(pf.num_row_groups):
                rows = pf.read_row_group(rg, columns=cols).to_pylist()
                need = 0
                for i, row in enumerate(rows):
                    need += self._add_chunk(f, rg, i, row)
                have = data_column_bytes(f, pf, rg)
                if need > have:
                    names = ", ".join(repr(r["layer_name"]) for r in rows)
                    raise ShapeMismatchError(f"{f}: row group {rg} (tensor {names}) needs {need} "
                                             f"data bytes for the shapes it declares, its data "
                                             f"column holds {have}")
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
        if bits is not None:
            if not isinstance(group_size, int) or group_size <= 0:
                raise FormatError(f"{where}: group_size {group_size!r} must be a positive integer")
            if row["scheme"] not in (None, "asymmetric", "symmetric"):
                raise FormatError(f"{where}: unknown scheme {row['scheme']!r}")
            if spatial:
                _equalization_scales(where, spatial, cols)
        entry = self.entries.get(name)
        if entry is None:
            entry = TensorEntry(
                name=name, shape=shape, dtype=dtype, num_params=row["num_params"],
                quant_type=qt, scheme=row["scheme"], method=row["method"],
                group_size=group_size if bits is not None else None,
                chunks=[], spatial_quant_json=spatial,
            )
            self.entries[name] = entry
        else:
            mine = (shape, dtype, qt, group_size if bits is not None else None, row["scheme"],
                    spatial)
            theirs = (entry.shape, entry.dtype, entry.quant_type, entry.group_size, entry.scheme,
                      entry.spatial_quant_json)
            if mine != theirs:
                raise FormatError(f"{where}: chunk disagrees with an earlier chunk of the same "
                                  f"tensor (shape/dtype/quant_type/group_size/scheme/equalization "
                                  f"{mine[:5]} vs {theirs[:5]})")
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
        rows, n_cols = view_2d(entry.shape)
        bits = entry.bits
        for loc in sorted(only if only is not None else entry.chunks, key=lambda c: c.row_start):
            where = f"{loc.file}: tensor {entry.name!r} rows [{loc.row_start}, " \
                    f"{loc.row_start + loc.row_count})"
            part = None
            try:
                table = self._parquet(loc.file).read_row_group(loc.row_group, columns=cols)
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
                    break
            except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
                raise FormatError(f"{where}: cannot read ({type(exc).__name__}: {exc})") from None
            if part is None:
                raise FormatError(f"{where}: chunk not found (the file changed since it was opened)")
            want = loc.row_count * _row_bytes(entry)
            if part["data"].size != want:
                raise ShapeMismatchError(f"{where}: {part['data'].size} data bytes, expected {want}")
            if bits is not None:
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
        return QuantizedTensor(
            data=np.concatenate([p["data"] for p in parts]) if len(parts) > 1 else parts[0]["data"],
            scales=np.concatenate([p["scales"].astype(np.float32) for p in parts]),
            zero_points=np.concatenate([p["zero_points"].astype(np.float32) for p in parts]),
            shape=entry.shape, dtype=entry.dtype, bits=entry.bits, group_size=entry.group_size,
            scheme=entry.scheme or "asymmetric", method=entry.method or "rtn",
            param_dtype="float16" if parts[0]["scales"].dtype == np.float16 else "float32",
            name=name,
        )

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
