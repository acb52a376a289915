"""ArrowQuant Parquet V2 reader: a model directory opened lazily, every row
checked against FORMAT.md sections 5 and 9 before its data is used."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine import dequantize_array
from ..engine.dtypes import ITEMSIZE, raw_to_array
from ..engine.tensor import QuantizedTensor
from ..errors import (ArrowQuantError, FormatError, ModelNotFoundError,
                      ShapeMismatchError, ValidationError)
from ..files import is_inside
from ..spec import (groups_per_row, packed_row_bytes, superblock_code_bits,
                    superblock_groups, view_2d)
from .arrow_checks import (blob_view, check_row_group_holds, check_schema,
                           check_shape, is_blob, is_int, is_int_list, is_param_list, is_str,
                           list_values)
from .v2_checks import (check_code_levels, check_coverage, check_superblock_layout, check_version,
                        equalization_scales, expand_chunk)
from ..jsonfile import Opt, read_json
from .v2_schema import GRID_QUANT_TYPES, INDEX_NAME, PIPELINE_FORMAT, SUPERBLOCK_COLUMNS



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
    code_levels: Optional[np.ndarray] = None  # a code grid's table (FORMAT.md section 10)

    @property
    def bits(self) -> Optional[int]:
        return QUANT_TYPES[self.quant_type]



def read_index(root: Path) -> Optional[Dict[str, str]]:
    """The weight map of a sharded V2 directory (tensor -> file name), checked:
    names are strings and every file stays inside the directory."""
    index = root / INDEX_NAME
    if not index.exists():
        return None
    weight_map = read_json(index, {"weight_map": dict})["weight_map"]
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"{index}: tensor {tensor!r} maps to {name!r}, not a file name")
        if Path(name).is_absolute() or ".." in Path(name).parts or not is_inside(root, root / name):
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
        if not is_inside(root, single):
            raise FormatError(f"{single}: a symlink that points outside the model directory")
        return [single]
    raise ModelNotFoundError(f"{root}: no model.parquet or {INDEX_NAME}: not an ArrowQuant V2 model")


# What the readers use of a V2 (or pipeline) metadata.json.
V2_METADATA_SCHEMA = {"format": Opt(str), "modality": Opt(str), "components": Opt([str]),
                      "summary": Opt(dict), "format_version": Opt(int)}


def read_metadata(path: Path) -> Dict[str, Any]:
    """metadata.json as a dict ({} when absent); MetadataError when unusable."""
    if not path.exists():
        return {}
    return read_json(path, V2_METADATA_SCHEMA)



V2_COLUMNS = {
    "layer_name": is_str, "row_start": is_int, "row_count": is_int, "shape": is_int_list,
    "dtype": is_str, "data": is_blob, "num_params": is_int, "quant_type": is_str,
    "scheme": is_str, "method": is_str, "group_size": is_int, "scales": is_param_list,
    "zero_points": is_param_list,
}
OPTIONAL_COLUMNS = {"spatial_quant_json": is_str, "param_codes": is_blob,
                    "param_code_bits": is_int, "superblock_groups": is_int,
                    "code_levels": is_param_list}
QUANT_TYPES = {"int2": 2, "int4": 4, "int8": 8, **GRID_QUANT_TYPES, "none": None}


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
            check_coverage(entry)
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
            cols += [c for c in ("spatial_quant_json", "param_code_bits", "superblock_groups",
                                 "code_levels") if c in names]
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
            raise FormatError(f"{where}: quant_type {qt!r} is not one of "
                              f"{', '.join(QUANT_TYPES)}")
        dtype = row["dtype"]
        if dtype not in ITEMSIZE:
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
                equalization_scales(where, spatial, cols)
            check_superblock_layout(where, p, K)
        elif p is not None or K is not None:
            raise FormatError(f"{where}: an unquantized tensor with superblock parameters")
        param_dtype = None if bits is None else "superblock" if p is not None else self._list_dtype
        levels = check_code_levels(where, qt, row.get("code_levels"))
        entry = self.entries.get(name)
        if entry is None:
            entry = TensorEntry(
                name=name, shape=shape, dtype=dtype, num_params=row["num_params"],
                quant_type=qt, scheme=row["scheme"], method=row["method"],
                group_size=group_size if bits is not None else None,
                chunks=[], spatial_quant_json=spatial, param_dtype=param_dtype,
                param_code_bits=p, superblock_groups=K, code_levels=levels,
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
            if (levels is None) != (entry.code_levels is None) or (
                    levels is not None and not np.array_equal(levels.view(np.uint32),
                                                              entry.code_levels.view(np.uint32))):
                raise FormatError(f"{where}: chunk's code_levels differ from an earlier chunk "
                                  "of the same tensor (one table per tensor, FORMAT.md 10.3)")
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
                        "data": blob_view(data_arr, i),
                        "scales": list_values(table.column("scales"), i),
                        "zero_points": list_values(table.column("zero_points"), i),
                    }
                    if has_codes:
                        codes_col = table.column("param_codes")
                        codes_arr = codes_col.chunk(0) if codes_col.num_chunks == 1 \
                            else pa.concat_arrays(codes_col.chunks)
                        part["param_codes"] = None if not codes_arr[i].is_valid \
                            else blob_view(codes_arr, i)
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
        entry = self.info(name)
        rows, cols = view_2d(entry.shape)
        part = next(self._chunk_rows(entry, [loc]))
        if entry.quant_type == "none":
            return raw_to_array(part["data"], entry.dtype, (loc.row_count, cols))
        qt = QuantizedTensor(
            data=part["data"], scales=part["scales"].astype(np.float32),
            zero_points=part["zero_points"].astype(np.float32), shape=(loc.row_count, cols),
            dtype=entry.dtype, bits=entry.bits, group_size=entry.group_size, name=name,
            code_levels=entry.code_levels)
        values = dequantize_array(qt).reshape(loc.row_count, cols)
        s = self._equalization(entry)
        return values / s[None, :] if s is not None else values

    def _equalization(self, entry: TensorEntry) -> Optional[np.ndarray]:
        if not entry.spatial_quant_json:
            return None
        s = equalization_scales(f"{self.root}: tensor {entry.name!r}", entry.spatial_quant_json,
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
            code_levels=entry.code_levels,
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
        entry = self.info(name)
        if entry.quant_type == "none":
            parts = list(self._chunk_rows(entry))
            if not parts:
                raise FormatError(f"{self.root}: tensor {name!r} has no chunks")
            raw = np.concatenate([p["data"] for p in parts]) if len(parts) > 1 else parts[0]["data"]
            values = raw_to_array(raw, entry.dtype, entry.shape)
            return values if out_dtype is None else values.astype(out_dtype, copy=False)
        values = dequantize_array(self.raw(name))
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


def _row_bytes(entry: TensorEntry) -> int:
    """Bytes one row of the 2-D view takes in the data column."""
    _, cols = view_2d(entry.shape)
    if entry.bits is None:
        return cols * ITEMSIZE[entry.dtype]
    return packed_row_bytes(cols, entry.bits)


def open_v2(path: Any) -> QuantizedModel:
    """Opens an ArrowQuant V2 directory lazily; a quantized pipeline's top
    directory is refused with the components to open instead."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such directory")
    meta = p / "metadata.json"
    if meta.exists():
        info = read_metadata(meta)
        if info.get("format") == PIPELINE_FORMAT:
            comps = ", ".join(f"{p / c}" for c in info.get("components", []))
            raise FormatError(f"{p}: a quantized diffusers pipeline; load one of its components: "
                              f"{comps}")
    return QuantizedModel(p)


load = open_v2
