"""ArrowQuant Parquet V2 writer: one row (and row group) per tensor chunk,
blobs handed to pyarrow without copies, files split into shards between
tensors, renamed into place and indexed when the run finishes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .arrow_checks import check_tensor
from ..errors import ArrowQuantError
from ..files import atomic_write_text, fresh, io_error
from .v2_schema import BLOB_COLUMNS, FORMAT_NAME, INDEX_NAME, ChunkRecord, schema


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
                 superblock: Optional[bool] = None,
                 grid: Optional[bool] = None) -> pa.RecordBatch:
    """The V2 row of one chunk, its blobs wrapped without copies. `param_dtype`,
    `superblock` and `grid` are the file's layout (schema(); default: the
    chunk's own)."""
    grid_row = rec.quant_type != "none" and rec.code_levels is not None
    sch = schema(param_dtype or rec.param_dtype, superblock, grid_row if grid is None else grid)
    if grid_row and "code_levels" not in sch.names:
        raise ValueError(f"tensor {rec.layer_name!r}: a code grid needs a file with the "
                         "code_levels column")
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
    if "code_levels" in sch.names:
        cols.append(_list_array(rec.code_levels, pa.float32()) if grid_row
                    else pa.nulls(1, sch.field("code_levels").type))
    return pa.RecordBatch.from_arrays(cols, schema=sch)


def open_writer(path: Path, param_dtype: str = "float32",
                extra_metadata: Optional[Dict[bytes, bytes]] = None,
                superblock: Optional[bool] = None, grid: bool = False) -> pq.ParquetWriter:
    """A Parquet writer for V2 rows: no compression or statistics on the blob
    columns (packed codes do not compress; huge min/max values break readers)."""
    sch = schema(param_dtype, superblock, grid)
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


class ShardWriter:
    """Appends chunk rows, in order, to model.parquet or numbered shards. A
    tensor never spans two files (the index maps each tensor to one), so a new
    file starts only between tensors, decided from the tensor's planned output
    bytes: the same boundaries whether a run was interrupted or not."""

    def __init__(self, out_dir: Path, shard_size: int, param_dtype: str,
                 superblock: bool = False, grid: bool = False):
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.param_dtype = param_dtype   # list value type of every file (float16 / float32)
        self.superblock = superblock     # every file has the superblock columns
        self.grid = grid                 # every file has code_levels (version 3)
        self.files: List[Path] = []      # temporary names, in order
        self.weight_map: Dict[str, int] = {}
        self._writer: Optional[pq.ParquetWriter] = None
        self._size = 0

    def begin_tensor(self, name: str, planned_bytes: int) -> None:
        if self._writer is None or (self._size and self._size + planned_bytes > self.shard_size):
            self._close_current()
            path = fresh(self.out_dir / f"model-{len(self.files) + 1:05d}.parquet.tmp")
            try:
                self._writer = open_writer(path, self.param_dtype,
                                           superblock=self.superblock, grid=self.grid)
            except OSError as exc:
                raise io_error(exc, f"writing {path}") from None
            self.files.append(path)
            self._size = 0
        self.weight_map[name] = len(self.files) - 1
        self._size += planned_bytes

    def write(self, rec: ChunkRecord) -> None:
        check_tensor(str(self.out_dir), rec.layer_name, list(rec.shape))
        assert self._writer is not None, "begin_tensor first"
        try:
            write_row(self._writer, record_batch(rec, self.param_dtype, self.superblock,
                                                 self.grid))
        except OSError as exc:
            raise io_error(exc, f"writing {self.files[-1]}") from None

    def _close_current(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                raise io_error(exc, f"writing {self.files[-1]}") from None
            self._writer = None

    def abort(self) -> None:
        try:
            self._close_current()
        except ArrowQuantError:
            pass

    def finish(self) -> List[str]:
        """Renames the files to their final names; writes the index when sharded."""
        self._close_current()
        n = len(self.files)
        names = ["model.parquet"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.parquet" for i in range(n)]
        for tmp, name in zip(self.files, names):
            os.replace(tmp, self.out_dir / name)
        if n > 1:
            total = sum((self.out_dir / name).stat().st_size for name in names)
            atomic_write_text(self.out_dir / INDEX_NAME, json.dumps(
                {"metadata": {"format": FORMAT_NAME, "total_size": total},
                 "weight_map": {t: names[i] for t, i in self.weight_map.items()}}, indent=2))
        return names
