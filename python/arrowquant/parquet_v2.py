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

from .errors import FormatError, ModelNotFoundError
from .tensor import ErrorSums, QuantizedTensor, view_2d

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


def model_files(root: Path) -> List[Path]:
    """The Parquet files of a V2 directory, in order."""
    index = root / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{index}: not a valid V2 index ({exc})") from None
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            p = (root / name)
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise FormatError(f"{index}: file {name!r} points outside the model directory")
            if not p.exists():
                raise ModelNotFoundError(f"{index}: names {name!r}, which does not exist")
            files.append(p)
        return files
    single = root / "model.parquet"
    if single.exists():
        return [single]
    raise ModelNotFoundError(f"{root}: no model.parquet or {INDEX_NAME}: not an ArrowQuant V2 model")


class QuantizedModel(Mapping):
    """A V2 directory opened lazily: a Mapping of tensor name -> dequantized
    float32 array (read and dequantized on access, one tensor at a time)."""

    def __init__(self, path: Any, engine: str = "native"):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ModelNotFoundError(f"{self.root}: not a directory")
        self.engine = engine
        meta_path = self.root / "metadata.json"
        self.metadata: Dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.files = model_files(self.root)
        self.entries: Dict[str, TensorEntry] = {}
        self._files: Dict[Path, pq.ParquetFile] = {}
        for f in self.files:
            self._index_file(f)

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
            cols = ["layer_name", "row_start", "row_count", "shape", "dtype", "num_params",
                    "quant_type", "scheme", "method", "group_size", "spatial_quant_json"]
            rg_offset = 0
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=cols).to_pylist()
                for row in t:
                    self._add_chunk(f, rg, row)
                rg_offset += 1
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise FormatError(f"{f}: cannot read as ArrowQuant Parquet V2 ({exc})") from None

    def _add_chunk(self, f: Path, rg: int, row: Dict[str, Any]) -> None:
        name = row["layer_name"]
        entry = self.entries.get(name)
        if entry is None:
            entry = TensorEntry(
                name=name, shape=tuple(row["shape"]), dtype=row["dtype"],
                num_params=row["num_params"], quant_type=row["quant_type"],
                scheme=row["scheme"], method=row["method"], group_size=row["group_size"],
                chunks=[], spatial_quant_json=row["spatial_quant_json"],
            )
            self.entries[name] = entry
        entry.chunks.append(ChunkLocation(f, rg, row["row_start"], row["row_count"]))

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
        cols = ["row_start", "row_count", "data", "scales", "zero_points", "layer_name"]
        for loc in sorted(only if only is not None else entry.chunks, key=lambda c: c.row_start):
            table = self._parquet(loc.file).read_row_group(loc.row_group, columns=cols)
            for i in range(table.num_rows):
                if table.column("layer_name")[i].as_py() != entry.name:
                    continue
                if table.column("row_start")[i].as_py() != loc.row_start:
                    continue
                data_arr = table.column("data").chunk(0)
                yield {
                    "row_start": loc.row_start,
                    "row_count": loc.row_count,
                    "data": _blob_view(data_arr, i),
                    "scales": _list_values(table.column("scales"), i),
                    "zero_points": _list_values(table.column("zero_points"), i),
                }

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
        s = np.asarray(json.loads(entry.spatial_quant_json).get("scales", []), dtype=np.float32)
        return s if s.size else None

    def raw(self, name: str) -> QuantizedTensor:
        """Packed codes and parameters of a quantized tensor (chunks joined)."""
        entry = self.info(name)
        if entry.quant_type == "none":
            raise FormatError(f"tensor {name!r} is stored unquantized; use model[{name!r}]")
        parts = list(self._chunk_rows(entry))
        _check_coverage(entry, parts)
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
            _check_coverage(entry, parts)
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
    """Bytes of element i of a (large_)binary array, without copying."""
    offsets_buf, data_buf = arr.buffers()[1], arr.buffers()[2]
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=off_type)
    j = arr.offset + i
    start, end = int(offsets[j]), int(offsets[j + 1])
    if data_buf is None:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(data_buf, dtype=np.uint8, count=end - start, offset=start)


def _list_values(col: pa.ChunkedArray, i: int) -> np.ndarray:
    arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    values = arr[i].values
    if values is None or len(values) == 0:
        return np.zeros(0, dtype=np.float32)
    return values.to_numpy(zero_copy_only=False)


def _check_coverage(entry: TensorEntry, parts: Sequence[Dict[str, Any]]) -> None:
    rows, _ = view_2d(entry.shape)
    expect = 0
    for p in parts:
        if p["row_start"] != expect:
            raise FormatError(f"tensor {entry.name!r}: chunks do not cover rows contiguously "
                              f"(expected row {expect}, found {p['row_start']})")
        expect += p["row_count"]
    if expect != rows and not (rows == 1 and expect == 1):
        raise FormatError(f"tensor {entry.name!r}: chunks cover {expect} of {rows} rows")


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
