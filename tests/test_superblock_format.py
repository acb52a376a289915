"""Two-level ("superblock") parameters in files (docs/FORMAT.md section 9):
the V2 columns, the reader's checks, staging and resume, byte counts and
bits per weight, and the API / CLI / config plumbing."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrowquant as aq
from arrowquant import _core, engine, parquet_v2, reference
from arrowquant.errors import (ArrowQuantError, ConfigurationError, FormatError,
                               ShapeMismatchError, ValidationError)
from arrowquant.sources.base import TensorInfo
from arrowquant.spec import stored_bytes
from arrowquant.engine.metrics import ErrorSums
from arrowquant.engine.tensor import QuantizedTensor
from arrowquant.engine.superblock import expand_superblock, pack_param_codes
from arrowquant.spec import (groups_per_row, packed_row_bytes, superblock_code_bits,
                             superblock_groups, superblocks_per_row, view_2d)
from conftest import write_v1
from test_hostile_inputs import copy_v2, exercise_v2, fuzz, mutate_and_exercise, small_model

# ---------------------------------------------------------------- a quantizer


def naive_superblock(array: Any, *, bits: int = 4, group_size: int = 32,
                     scheme: str = "asymmetric", method: str = "rtn",
                     param_dtype: str = "superblock", dtype: Optional[str] = None,
                     shape: Optional[Sequence[int]] = None, name: str = "tensor",
                     threads: int = 0, force_scalar: bool = False) -> QuantizedTensor:
    """A legitimate superblock tensor without the engine's search: rtn
    parameters per group, units = the super-block's largest scale / zero
    point over 2^p - 1 (float16), codes rounded, then the engine's codes for
    the expanded parameters (quantize_with_params): files can then be tested
    with tensors the engine's search would not make (sizes, shapes, codes)."""
    assert param_dtype == "superblock" and scheme == "asymmetric"
    src = np.asarray(array)
    if dtype is not None and dtype != src.dtype.name:
        x = reference.to_float32(src.reshape(-1).view(np.uint8), dtype)
    else:
        x = src.astype(np.float32).reshape(-1)
        dtype = src.dtype.name
    shape = tuple(shape if shape is not None else src.shape)
    rows, cols = view_2d(shape)
    g, G = group_size, groups_per_row(cols, group_size)
    K, S, p = superblock_groups(g), superblocks_per_row(cols, g), superblock_code_bits(bits)
    top = (1 << p) - 1
    Q = (1 << bits) - 1
    padded = np.full((rows, G * g), np.nan, dtype=np.float32)
    padded[:, :cols] = x.reshape(rows, cols)
    grp = padded.reshape(rows, G, g)
    lo, hi = np.nanmin(grp, axis=2), np.nanmax(grp, axis=2)
    lo0, hi0 = np.minimum(lo, 0), np.maximum(hi, 0)
    s = np.where(hi0 > lo0, (hi0 - lo0) / Q, 1.0).astype(np.float32)
    z = (-lo0 / s).astype(np.float32)
    sb = np.arange(G) // K
    smax = np.zeros((rows, S), np.float32)
    zmax = np.zeros((rows, S), np.float32)
    np.maximum.at(smax, (slice(None), sb), s)
    np.maximum.at(zmax, (slice(None), sb), z)
    d = np.maximum((smax / top).astype(np.float16).astype(np.float32), np.float32(2.0 ** -24))
    dz = (zmax / top).astype(np.float16).astype(np.float32)
    a = np.clip(np.rint(s / d[:, sb]), 1, top).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dz[:, sb] > 0, np.clip(np.rint(z / dz[:, sb]), 0, top), 0).astype(np.uint8)
    scales, zeros = expand_superblock(d, dz, a, c, rows, G, K)
    raw = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
    packed = np.empty(rows * packed_row_bytes(cols, bits), np.uint8)
    sums = _core.quantize_with_params(raw, dtype, rows, cols, bits, g, "asymmetric", scales,
                                      zeros, packed, 1, False)
    return QuantizedTensor(
        data=packed, scales=scales, zero_points=zeros, shape=shape, dtype=dtype, bits=bits,
        group_size=g, scheme=scheme, method=method, param_dtype="superblock", name=name,
        error=ErrorSums(*sums), superblock_scales=d.reshape(-1),
        superblock_zero_points=dz.reshape(-1))


@pytest.fixture
def sb_quantize():
    """What the pipeline runs for a superblock plan (the engine's own search)."""
    return engine.quantize_array


def _record(qt: QuantizedTensor, row_start: int, row_count: int) -> parquet_v2.ChunkRecord:
    """The V2 row of rows [row_start, row_start + row_count) of `qt`."""
    rows, cols = view_2d(qt.shape)
    G, S = qt.groups_per_row, superblocks_per_row(cols, qt.group_size)
    rb = packed_row_bytes(cols, qt.bits)
    r0, r1 = row_start, row_start + row_count
    codes = parquet_v2.superblock_params(
        qt.name, row_count, cols, qt.bits, qt.group_size, qt.scales[r0 * G:r1 * G],
        qt.zero_points[r0 * G:r1 * G], qt.superblock_scales[r0 * S:r1 * S],
        qt.superblock_zero_points[r0 * S:r1 * S])
    return parquet_v2.ChunkRecord(
        layer_name=qt.name, row_start=r0, row_count=row_count, shape=qt.shape, dtype=qt.dtype,
        data=qt.data[r0 * rb:r1 * rb], num_params=qt.numel, quant_type=f"int{qt.bits}",
        scheme=qt.scheme, method=qt.method, group_size=qt.group_size,
        scales=qt.superblock_scales[r0 * S:r1 * S],
        zero_points=qt.superblock_zero_points[r0 * S:r1 * S], param_dtype="superblock",
        param_codes=codes, param_code_bits=qt.param_code_bits,
        superblock_groups=qt.superblock_groups)


def write_model(d: Path, records: List[parquet_v2.ChunkRecord], value_type: str = "float16",
                superblock: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    w = parquet_v2.open_writer(d / "model.parquet", value_type, superblock=superblock)
    for rec in records:
        parquet_v2.write_row(w, parquet_v2.record_batch(rec, value_type, superblock))
    w.close()
    return d


def _bits(a: np.ndarray) -> List[int]:
    return np.asarray(a, np.float32).view(np.uint32).tolist()


def _matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)


# ---------------------------------------------------------------- file round trip


@pytest.mark.parametrize("bits,g,cols", [(4, 32, 256), (2, 16, 200), (4, 32, 600), (8, 64, 96),
                                         (4, 128, 300)])
def test_write_read_round_trip_is_bit_exact(tmp_path, bits, g, cols):
    x = _matrix(7, cols, seed=bits + g)
    qt = naive_superblock(x, bits=bits, group_size=g, name="w")
    # Two chunks: rows [0, 3) and [3, 7).
    d = write_model(tmp_path / "m", [_record(qt, 0, 3), _record(qt, 3, 4)])
    model = aq.load(d)
    e = model.info("w")
    assert (e.param_dtype, e.param_code_bits, e.superblock_groups) == (
        "superblock", superblock_code_bits(bits), superblock_groups(g))
    raw = model.raw("w")
    assert type(raw) is QuantizedTensor and raw.param_dtype == "superblock"
    assert raw.data.tobytes() == qt.data.tobytes()
    assert _bits(raw.scales) == _bits(qt.scales)
    assert _bits(raw.zero_points) == _bits(qt.zero_points)
    assert _bits(raw.superblock_scales) == _bits(qt.superblock_scales)
    assert _bits(raw.superblock_zero_points) == _bits(qt.superblock_zero_points)
    assert raw.param_codes().tobytes() == qt.param_codes().tobytes()
    assert raw.nbytes == qt.nbytes
    expect = engine.dequantize_array(qt)
    assert _bits(model["w"]) == _bits(expect)
    # Chunk by chunk (what ParquetV2Source and the dequantize command use).
    parts = [model.dequantize_chunk("w", loc) for loc in e.chunks]
    assert _bits(np.concatenate(parts).reshape(-1)) == _bits(expect.reshape(-1))
    kv = pq.ParquetFile(d / "model.parquet").schema_arrow.metadata
    assert kv[b"arrowquant.format_version"] == b"2"


def test_file_stores_units_and_codes_as_specified(tmp_path):
    """The columns hold exactly what section 9 says: float16 units, the
    packed stream of the chunk's groups, p and K."""
    x = _matrix(3, 600)
    qt = naive_superblock(x, bits=4, group_size=32, name="w")
    d = write_model(tmp_path / "m", [_record(qt, 0, 3)])
    t = pq.read_table(d / "model.parquet")
    assert t.schema.field("scales").type == pa.list_(pa.float16())
    assert t.schema.field("param_codes").type == pa.large_binary()
    row = t.to_pylist()[0]
    assert row["param_code_bits"] == 6 and row["superblock_groups"] == 8
    # 19 groups per row -> 3 super-blocks; scale units, then zero units, and
    # zero_points empty (a reader predating section 9 refuses the row)
    assert len(row["scales"]) == 2 * 3 * 3 and row["zero_points"] == []
    np.testing.assert_array_equal(np.float32(row["scales"][:9]), qt.superblock_scales)
    np.testing.assert_array_equal(np.float32(row["scales"][9:]), qt.superblock_zero_points)
    # Decode the stream by hand: code k at bits 6k .. 6k+5, LSB first.
    stream = row["param_codes"]
    assert len(stream) == math.ceil(3 * 19 * 2 * 6 / 8)
    value = int.from_bytes(stream, "little")
    codes = [(value >> (6 * k)) & 63 for k in range(3 * 19 * 2)]
    a, c = np.array(codes[0::2]), np.array(codes[1::2])
    d_units = np.float32(row["scales"][:9]).reshape(3, 3)[:, np.arange(19) // 8].reshape(-1)
    np.testing.assert_array_equal(a * d_units, qt.scales)
    assert value >> (3 * 19 * 2 * 6) == 0  # padding bits are zero
    # Statistics are off for the blob, on for the small columns.
    md = pq.ParquetFile(d / "model.parquet").metadata.row_group(0)
    stats = {md.column(i).path_in_schema: md.column(i).is_stats_set for i in range(md.num_columns)}
    assert stats["param_codes"] is False and stats["param_code_bits"] is True


def test_mixed_file_float32_lists_and_nonstandard_layout(tmp_path):
    """A file with float32 tensors keeps float32 lists; superblock units are
    exact in them. A tensor written with p / K other than the engine's reads
    with what the file says."""
    x = _matrix(4, 256, seed=3)
    sb = naive_superblock(x, bits=4, group_size=32, name="sb")
    plain = engine.quantize_array(x, bits=4, group_size=32, param_dtype="float32", name="f32")
    rec_plain = parquet_v2.ChunkRecord(
        layer_name="f32", row_start=0, row_count=4, shape=(4, 256), dtype="float32",
        data=plain.data, num_params=plain.numel, quant_type="int4", scheme="asymmetric",
        method="rtn", group_size=32, scales=plain.scales, zero_points=plain.zero_points,
        param_dtype="float32")
    # The same parameters stored with 8-bit codes and K = 4.
    G = 8
    a = (sb.scales.reshape(4, G) / sb.superblock_scales.reshape(4, 1)).astype(np.uint8)
    c = np.zeros_like(a)
    nz = sb.superblock_zero_points.reshape(4, 1) > 0
    c[:] = np.where(nz, sb.zero_points.reshape(4, G) / np.where(nz, sb.superblock_zero_points
                                                                .reshape(4, 1), 1), 0)
    d2 = np.repeat(sb.superblock_scales.reshape(4, 1), 2, axis=1).reshape(-1)
    dz2 = np.repeat(sb.superblock_zero_points.reshape(4, 1), 2, axis=1).reshape(-1)
    rec_wide = parquet_v2.ChunkRecord(
        layer_name="wide", row_start=0, row_count=4, shape=(4, 256), dtype="float32",
        data=sb.data, num_params=sb.numel, quant_type="int4", scheme="asymmetric", method="rtn",
        group_size=32, scales=d2, zero_points=dz2, param_dtype="superblock",
        param_codes=pack_param_codes(a, c, 8), param_code_bits=8, superblock_groups=4)
    value_type, superblock = parquet_v2.file_layout(["float32", "superblock"])
    assert (value_type, superblock) == ("float32", True)
    d = write_model(tmp_path / "m", [rec_plain, _record(sb, 0, 4), rec_wide], value_type,
                    superblock)
    model = aq.load(d)
    assert pq.read_schema(d / "model.parquet").field("scales").type == pa.list_(pa.float32())
    assert model.info("f32").param_dtype == "float32"
    assert _bits(model["f32"]) == _bits(engine.dequantize_array(plain))
    assert _bits(model["sb"]) == _bits(engine.dequantize_array(sb))
    wide = model.raw("wide")
    assert (wide.param_code_bits, wide.superblock_groups) == (8, 4)
    assert _bits(wide.scales) == _bits(sb.scales)
    assert wide.param_codes().tobytes() == pack_param_codes(a, c, 8).tobytes()
    assert _bits(model["wide"]) == _bits(engine.dequantize_array(sb))


def test_old_files_without_the_columns_still_read(tmp_path):
    x = _matrix(5, 128)
    qt = engine.quantize_array(x, bits=4, group_size=32, param_dtype="float16", name="w")
    rec = parquet_v2.ChunkRecord(
        layer_name="w", row_start=0, row_count=5, shape=(5, 128), dtype="float32", data=qt.data,
        num_params=qt.numel, quant_type="int4", scheme="asymmetric", method="mse",
        group_size=32, scales=qt.scales, zero_points=qt.zero_points, param_dtype="float16")
    d = write_model(tmp_path / "old", [rec], "float16", superblock=False)
    sch = pq.read_schema(d / "model.parquet")
    assert "param_codes" not in sch.names
    assert sch.metadata[b"arrowquant.format_version"] == b"1"
    model = aq.load(d)
    assert model.info("w").param_dtype == "float16"
    assert model.raw("w").param_dtype == "float16"
    assert _bits(model["w"]) == _bits(engine.dequantize_array(qt))
    # The same row in a file with the superblock columns (null for it).
    d2 = write_model(tmp_path / "new", [rec], "float16", superblock=True)
    assert pq.read_table(d2 / "model.parquet").column("param_codes").null_count == 1
    assert _bits(aq.load(d2)["w"]) == _bits(engine.dequantize_array(qt))


def test_duckdb_and_pyarrow_read_the_file(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    qt = naive_superblock(_matrix(6, 256), bits=4, group_size=32, name="w")
    d = write_model(tmp_path / "m", [_record(qt, 0, 2), _record(qt, 2, 4)])
    t = pq.read_table(d / "model.parquet")
    assert t.num_rows == 2
    got = duckdb.sql(
        f"SELECT layer_name, row_count, param_code_bits, superblock_groups, "
        f"octet_length(param_codes) AS n, len(scales) AS s, len(zero_points) AS z "
        f"FROM read_parquet('{d / 'model.parquet'}') ORDER BY row_start").fetchall()
    assert got == [("w", 2, 6, 8, 24, 4, 0), ("w", 4, 6, 8, 48, 8, 0)]


# ---------------------------------------------------------------- hostile rows


@pytest.fixture
def sb_rows(tmp_path):
    qt = naive_superblock(_matrix(3, 256, seed=5), bits=4, group_size=32, name="w")
    rec = _record(qt, 0, 3)
    table = pa.Table.from_batches([parquet_v2.record_batch(rec)])
    return table.to_pylist()


def _write_rows(d: Path, rows: List[Dict[str, Any]], sch: Optional[pa.Schema] = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    sch = sch or parquet_v2.schema("superblock")
    pq.write_table(pa.Table.from_pylist(rows, schema=sch), d / "model.parquet")
    return d


def _flip_code(stream: bytes, k: int, value: int, p: int = 6) -> bytes:
    v = int.from_bytes(stream, "little")
    v &= ~(((1 << p) - 1) << (p * k))
    v |= value << (p * k)
    return v.to_bytes(len(stream), "little")


HOSTILE = {
    "units_short": (lambda r: r.update(scales=r["scales"][:-1]), ShapeMismatchError,
                    "superblock units"),
    "zero_units_long": (lambda r: r.update(zero_points=r["zero_points"] + [0.0]),
                        ShapeMismatchError, "zero_points in a superblock row"),
    "units_swapped_into_zero_points": (
        lambda r: r.update(zero_points=r["scales"][3:], scales=r["scales"][:3]),
        ShapeMismatchError, "zero_points in a superblock row"),
    "codes_short": (lambda r: r.update(param_codes=r["param_codes"][:-1]), ShapeMismatchError,
                    "param_codes holds"),
    "codes_null": (lambda r: r.update(param_codes=None), FormatError, "param_codes is null"),
    "p_zero": (lambda r: r.update(param_code_bits=0), FormatError, "outside 1..8"),
    "p_nine": (lambda r: r.update(param_code_bits=9), FormatError, "outside 1..8"),
    "p_null": (lambda r: r.update(param_code_bits=None), FormatError, "one is null"),
    "k_zero": (lambda r: r.update(superblock_groups=0), FormatError, "positive integer"),
    "k_negative": (lambda r: r.update(superblock_groups=-8), FormatError, "positive integer"),
    "scale_code_zero": (lambda r: r.update(param_codes=_flip_code(r["param_codes"], 4, 0)),
                        ValidationError, "scale code of group 2 is 0"),
    # scales = 3 scale units (one super-block per row), then 3 zero units
    "dz_negative": (lambda r: r.update(scales=r["scales"][:3] + [-1.0] + r["scales"][4:]),
                    ValidationError, "zero unit 0 is -1"),
    "dz_inf": (lambda r: r.update(scales=r["scales"][:4] + [math.inf] + r["scales"][5:]),
               ValidationError, "zero unit 1 is inf"),
    "d_zero": (lambda r: r.update(scales=[0.0] + r["scales"][1:]), ValidationError,
               "scale unit 0 is 0"),
    "d_negative": (lambda r: r.update(scales=[-0.5] + r["scales"][1:]), ValidationError,
                   "must be finite and > 0"),
    "d_nan": (lambda r: r.update(scales=r["scales"][:2] + [math.nan] + r["scales"][3:]),
              ValidationError, "scale unit 2 is nan"),
    "d_null_value": (lambda r: r.update(scales=[None] + r["scales"][1:]), ValidationError,
                     "scale unit 0 is nan"),
    "padding": (lambda r: None, ValidationError, "padding bits"),
    "unquantized_with_p": (lambda r: r.update(quant_type="none", group_size=None,
                                              data=b"\0" * (3 * 256 * 4)),
                           FormatError, "unquantized tensor with superblock"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_superblock_rows_end_in_named_errors(sb_rows, tmp_path, case):
    edit, exc, needle = HOSTILE[case]
    row = dict(sb_rows[0])
    if case == "padding":
        # 3 rows x 8 groups x 12 bits = 36 bytes, no padding; use 3 rows of
        # 7 groups (224 columns): 252 bits -> 32 bytes with 4 padding bits.
        qt = naive_superblock(_matrix(3, 224, seed=6), bits=4, group_size=32, name="w")
        row = pa.Table.from_batches([parquet_v2.record_batch(_record(qt, 0, 3))]).to_pylist()[0]
        codes = bytearray(row["param_codes"])
        codes[-1] |= 0x80
        row["param_codes"] = bytes(codes)
    edit(row)
    d = _write_rows(tmp_path / case, [row])
    with pytest.raises(exc, match=needle) as info:
        model = aq.load(d)
        model["w"]
    assert str(d) in str(info.value)


def test_units_that_are_not_float16_values_are_rejected(sb_rows, tmp_path):
    row = dict(sb_rows[0])
    row["scales"] = [float(np.float32(row["scales"][0]) * np.float32(1 + 2 ** -20))] + \
        row["scales"][1:]
    d = _write_rows(tmp_path / "m", [row], parquet_v2.schema("float32", True))
    with pytest.raises(ValidationError, match="not a float16 value"):
        aq.load(d)["w"]


def test_param_codes_in_a_row_without_superblock_layout(sb_rows, tmp_path):
    row = dict(sb_rows[0])
    row.update(param_code_bits=None, superblock_groups=None)
    d = _write_rows(tmp_path / "m", [row])
    with pytest.raises(ArrowQuantError, match="param_codes set in a row without"):
        aq.load(d)["w"]


def test_chunks_disagreeing_on_the_layout(tmp_path):
    qt = naive_superblock(_matrix(4, 256), bits=4, group_size=32, name="w")
    rows = pa.Table.from_batches([parquet_v2.record_batch(_record(qt, 0, 2)),
                                  parquet_v2.record_batch(_record(qt, 2, 2))]).to_pylist()
    rows[1]["superblock_groups"] = 4
    d = _write_rows(tmp_path / "m", rows)
    with pytest.raises(FormatError, match="disagrees with an earlier chunk"):
        aq.load(d)


@pytest.mark.parametrize("version,ok", [(b"1", True), (b"2", True), (b"3", True), (b"4", False),
                                        (b"two", False)])
def test_format_version_is_checked(sb_rows, tmp_path, version, ok):
    sch = parquet_v2.schema("superblock")
    sch = sch.with_metadata({**sch.metadata, b"arrowquant.format_version": version})
    d = _write_rows(tmp_path / "m", sb_rows, sch)
    if ok:
        assert aq.load(d)["w"].shape == (3, 256)
    else:
        with pytest.raises(FormatError, match="format_version|format version 4"):
            aq.load(d)


def test_only_some_superblock_columns(sb_rows, tmp_path):
    sch = parquet_v2.schema("superblock")
    sch = sch.remove(sch.get_field_index("superblock_groups"))
    rows = [{k: v for k, v in r.items() if k != "superblock_groups"} for r in sb_rows]
    d = _write_rows(tmp_path / "m", rows, sch)
    with pytest.raises(FormatError, match="without \\['superblock_groups'\\]"):
        aq.load(d)


def test_writer_refuses_incoherent_engine_output():
    qt = naive_superblock(_matrix(2, 256), bits=4, group_size=32, name="w")
    bad_scales = qt.scales.copy()
    bad_scales[3] *= np.float32(1.0001)  # not a code times its unit
    with pytest.raises(aq.QuantizationError, match="tensor 'w'"):
        parquet_v2.superblock_params("w", 2, 256, 4, 32, bad_scales, qt.zero_points,
                                     qt.superblock_scales, qt.superblock_zero_points)
    with pytest.raises(aq.QuantizationError, match="not float16 values"):
        parquet_v2.superblock_params("w", 2, 256, 4, 32, qt.scales, qt.zero_points,
                                     qt.superblock_scales * np.float32(1 + 2 ** -20),
                                     qt.superblock_zero_points)
    rec = _record(qt, 0, 2)
    with pytest.raises(ValueError, match="superblock columns"):
        parquet_v2.record_batch(rec, "float16", superblock=False)


# ---------------------------------------------------------------- byte counts


@pytest.mark.parametrize("bits,g,bpw", [(4, 32, 4.5), (2, 16, 2.625), (8, 64, 8.3125)])
def test_stored_bytes_and_bits_per_weight(bits, g, bpw):
    qt = naive_superblock(_matrix(8, 512), bits=bits, group_size=g)
    rec = _record(qt, 0, 8)
    assert rec.stored_bytes == qt.nbytes == stored_bytes(8, 512, bits, g, "superblock")
    assert 8 * qt.nbytes / qt.numel == pytest.approx(bpw)
    from arrowquant.planning.allocate import layer_cost_bits

    info = TensorInfo("w", (8, 512), "float32", 8 * 512 * 4)
    assert layer_cost_bits(info, bits, g, "superblock") == 8 * qt.nbytes
    assert layer_cost_bits(info, bits, g, "float16") == 8 * stored_bytes(8, 512, bits, g,
                                                                          "float16")


# ---------------------------------------------------------------- the pipeline


def _sb_model(tmp_path: Path) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    tensors = {
        "a.weight": (rng.standard_normal((96, 256)) * 0.05).astype(np.float16),
        "b.weight": (rng.standard_normal((40, 600)) * 0.05).astype(np.float32),
        "c.weight": (rng.standard_normal((8, 4, 3, 3)) * 0.1).astype(np.float16),
        "norm.weight": np.ones(256, np.float16),
    }
    write_v1(tmp_path / "src", tensors)
    return tensors


def _file_bytes_of(model: Any, name: str) -> int:
    """What the files store for a tensor: data, units at 2 bytes, codes."""
    total = 0
    e = model.info(name)
    for part in model._chunk_rows(e):
        total += part["data"].size
        if e.param_dtype == "superblock":
            total += 2 * (part["sb_scales"].size + part["sb_zero_points"].size)
            total += parquet_v2.param_code_bytes(part["scales"].size, e.param_code_bits)
        elif e.bits is not None:
            total += 2 * 2 * part["scales"].size
    return total


def test_pipeline_writes_superblock_chunks_and_shards(tmp_path, sb_quantize):
    tensors = _sb_model(tmp_path)
    out = tmp_path / "out"
    s = aq.quantize(tmp_path / "src", out, bits=4, group_size=32, method="rtn",
                    param_dtype="superblock", chunk_size="8KiB", shard_size="16KiB",
                    progress=False)
    model = aq.load(out)
    assert len(model.files) > 1
    assert max(len(model.info(n).chunks) for n in model) > 1
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format_version"] == 2
    for f in model.files:
        assert pq.read_schema(f).metadata[b"arrowquant.format_version"] == b"2"
    report = {r["name"]: r for r in json.loads((out / "quantization_report.json").read_text())[
        "tensors"]}
    for name, a in tensors.items():
        if a.ndim < 2:
            assert model.info(name).quant_type == "none"
            continue
        assert model.info(name).param_dtype == "superblock"
        expect = sb_quantize(a, bits=4, group_size=32, method="rtn", param_dtype="superblock",
                             name=name)
        assert _bits(model[name].reshape(-1)) == _bits(engine.dequantize_array(expect).reshape(-1))
        r = report[name]
        assert r["param_dtype"] == "superblock"
        assert r["output_bytes"] == _file_bytes_of(model, name)
        assert r["bits_per_weight"] == 8.0 * r["output_bytes"] / a.size
    assert s.output_bytes == sum(r["output_bytes"] for r in report.values())
    assert s.bits_per_weight == 8.0 * s.output_bytes / s.params
    info = aq.inspect(out)
    assert {t["name"]: t["param_dtype"] for t in info["tensors"]} == {
        "a.weight": "superblock", "b.weight": "superblock", "c.weight": "superblock",
        "norm.weight": None}
    # Validation compares the dequantized tensors with the originals.
    assert aq.validate(tmp_path / "src", out).passed


def test_reference_engine_writes_the_same_bytes(tmp_path, sb_quantize):
    _sb_model(tmp_path)
    for eng in ("native", "reference"):
        aq.quantize(tmp_path / "src", tmp_path / eng, bits=2, group_size=16, method="rtn",
                    param_dtype="superblock", engine=eng, progress=False)
    assert (tmp_path / "native" / "model.parquet").read_bytes() == \
        (tmp_path / "reference" / "model.parquet").read_bytes()


def test_resume_after_an_interruption_writes_identical_bytes(tmp_path, sb_quantize):
    _sb_model(tmp_path)
    kw = dict(bits=4, group_size=32, method="rtn", param_dtype="superblock", chunk_size="4KiB",
              shard_size="16KiB")
    aq.quantize(tmp_path / "src", tmp_path / "full", progress=False, **kw)
    cancel = threading.Event()
    seen: List[float] = []

    def progress(msg: str, frac: float) -> None:
        seen.append(frac)
        if len(seen) == 6:
            cancel.set()

    part = tmp_path / "part"
    with pytest.raises(aq.CancelledError):
        aq.quantize(tmp_path / "src", part, progress=progress, cancel=cancel, **kw)
    staged = sorted((part / ".arrowquant-staging").glob("*.part"))
    assert staged
    rec = __import__("arrowquant.run.staging", fromlist=["read_part"]).read_part(staged[0])
    assert rec.param_dtype == "superblock" and rec.param_codes is not None
    aq.quantize(tmp_path / "src", part, resume=True, progress=False, **kw)
    full = sorted(p.name for p in (tmp_path / "full").glob("*.parquet"))
    assert full == sorted(p.name for p in part.glob("*.parquet")) and len(full) > 1
    for name in full:
        assert (tmp_path / "full" / name).read_bytes() == (part / name).read_bytes()
    a = json.loads((tmp_path / "full" / "quantization_report.json").read_text())["tensors"]
    b = json.loads((part / "quantization_report.json").read_text())["tensors"]
    assert [r["output_bytes"] for r in a] == [r["output_bytes"] for r in b]


def test_a_damaged_superblock_part_is_redone(tmp_path, sb_quantize):
    from arrowquant.run.staging import read_part_info

    _sb_model(tmp_path)
    kw = dict(bits=4, group_size=32, method="rtn", param_dtype="superblock", chunk_size="4KiB")
    cancel = threading.Event()
    seen: List[float] = []

    def progress(msg: str, frac: float) -> None:
        seen.append(frac)
        if len(seen) == 4:
            cancel.set()

    with pytest.raises(aq.CancelledError):
        aq.quantize(tmp_path / "src", tmp_path / "p", progress=progress, cancel=cancel, **kw)
    staged = sorted((tmp_path / "p" / ".arrowquant-staging").glob("*.part"))
    assert staged and read_part_info(staged[0]) is not None
    staged[0].write_bytes(staged[0].read_bytes()[:-1])  # lose the last code byte
    assert read_part_info(staged[0]) is None
    aq.quantize(tmp_path / "src", tmp_path / "p", resume=True, progress=False, **kw)
    aq.quantize(tmp_path / "src", tmp_path / "q", progress=False, **kw)
    assert (tmp_path / "p" / "model.parquet").read_bytes() == \
        (tmp_path / "q" / "model.parquet").read_bytes()


def test_v2_superblock_model_as_input(tmp_path, sb_quantize):
    """A superblock V2 model read back as input (ParquetV2Source) gives the
    dequantized values."""
    tensors = _sb_model(tmp_path)
    aq.quantize(tmp_path / "src", tmp_path / "sb", bits=4, group_size=32, method="rtn",
                param_dtype="superblock", progress=False)
    from arrowquant.sources import open_model

    model = aq.load(tmp_path / "sb")
    with open_model(tmp_path / "sb") as src:
        assert src.format == "arrowquant-parquet-v2"
        raw = src.read("b.weight", 10, 5)
        got = np.frombuffer(raw.tobytes(), np.float32).reshape(5, 600)
        np.testing.assert_array_equal(got, model["b.weight"][10:15])
    assert set(model) == set(tensors)


# ---------------------------------------------------------------- API / CLI / config


def test_superblock_with_symmetric_or_calibration_is_refused(tmp_path):
    _sb_model(tmp_path)
    with pytest.raises(ValidationError, match="asymmetric"):
        aq.quantize(tmp_path / "src", tmp_path / "o1", scheme="symmetric",
                    param_dtype="superblock", progress=False)
    assert not (tmp_path / "o1").exists()
    with pytest.raises(ConfigurationError, match="superblock' needs scheme 'asymmetric'"):
        aq.DiffusionQuantConfig(scheme="symmetric", param_dtype="superblock").validate()


def test_config_yaml_and_env_accept_superblock(tmp_path):
    from arrowquant.config import DiffusionQuantConfig, resolve

    f = tmp_path / "c.yaml"
    f.write_text("param_dtype: superblock\nbit_width: 2\ngroup_size: 16\n")
    cfg = resolve(config_file=f)
    assert (cfg.param_dtype, cfg.bit_width) == ("superblock", 2)
    env = DiffusionQuantConfig.from_env({"ARROW_QUANT_PARAM_DTYPE": "superblock"})
    assert env.param_dtype == "superblock"
    with pytest.raises(ConfigurationError, match="param_dtype"):
        DiffusionQuantConfig.from_env({"ARROW_QUANT_PARAM_DTYPE": "int8"})


def test_cli_param_dtype_superblock(tmp_path, sb_quantize, capsys):
    from arrowquant.cli import build_parser, main

    help_text = build_parser().format_help()
    for sub in build_parser()._subparsers._group_actions[0].choices.values():
        if "--param-dtype" in sub.format_help():
            help_text = " ".join(sub.format_help().split())
            break
    assert "superblock" in help_text and "4.5" in help_text and "2.625" in help_text
    _sb_model(tmp_path)
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "src"), str(out), "--bits", "2", "--group-size",
                 "16", "--param-dtype", "superblock", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "metadata.json").read_text())["summary"]
    assert f"{s['bits_per_weight']:.2f} bits per weight" in printed
    assert aq.load(out).info("a.weight").param_dtype == "superblock"
    assert main(["inspect", str(out)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "a.weight" in l]
    assert lines and "superblock" in lines[0]
    assert main(["validate", str(tmp_path / "src"), str(out)]) == 0


# ---------------------------------------------------------------- end to end


def test_end_to_end_api_mse_superblock_is_the_engines_tensor(tmp_path):
    tensors = _sb_model(tmp_path)
    out = tmp_path / "out"
    s = aq.quantize(tmp_path / "src", out, bits=4, group_size=32, param_dtype="superblock",
                    method="mse", chunk_size="8KiB", progress=False)
    model = aq.load(out)
    for name, a in tensors.items():
        if a.ndim < 2:
            continue
        expect = engine.quantize_array(a, bits=4, group_size=32, method="mse",
                                       param_dtype="superblock")
        raw = model.raw(name)
        assert raw.method == "mse" and raw.param_dtype == "superblock"
        assert raw.data.tobytes() == expect.data.tobytes()
        assert _bits(raw.scales) == _bits(expect.scales)
        assert _bits(raw.zero_points) == _bits(expect.zero_points)
        assert _bits(raw.superblock_scales) == _bits(expect.superblock_scales)
        assert _bits(raw.superblock_zero_points) == _bits(expect.superblock_zero_points)
        assert raw.param_codes().tobytes() == expect.param_codes().tobytes()
    quantized = sum(a.size for a in tensors.values() if a.ndim >= 2)
    assert s.quantized_tensors == 3 and quantized < s.params
    report = aq.validate(tmp_path / "src", out)
    assert report.passed and report.mean_cosine > 0.99


def test_diffusion_planner_budget_counts_superblock_parameters(tmp_path):
    """Mixed precision at a target: the planner's achieved bits per weight is
    what the files store (every tensor here fits one chunk)."""
    from arrowquant.config import DiffusionQuantConfig
    from arrowquant.planning.diffusion import DiffusionPlanner

    _sb_model(tmp_path)
    cfg = DiffusionQuantConfig(bit_width=4, group_size=32, param_dtype="superblock",
                               target_bpw=4.0, fallback_thresholds={2: 0.0, 4: 0.0, 8: 0.0})
    planner = DiffusionPlanner(cfg, source=tmp_path / "src")
    s = aq.quantize(tmp_path / "src", tmp_path / "out", config=cfg, planner=planner,
                    progress=False)
    assert planner.summary is not None
    assert planner.summary.achieved_bpw <= 4.0
    assert s.bits_per_weight == pytest.approx(planner.summary.achieved_bpw, rel=1e-12)
    assert {r.param_dtype for r in s.records if r.bits} == {"superblock"}


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 129])
def test_code_stream_fast_paths_equal_the_definition(p, n):
    rng = np.random.default_rng(p * 1000 + n)
    a = rng.integers(1, 1 << p, n, dtype=np.uint8) if p > 0 else None
    c = rng.integers(0, 1 << p, n, dtype=np.uint8)
    stream = parquet_v2.pack_codes(a, c, p)
    assert stream.tobytes() == pack_param_codes(a, c, p).tobytes()
    a2, c2 = parquet_v2.unpack_codes(stream, n, p)
    assert a2.tolist() == a.tolist() and c2.tolist() == c.tolist()
    used = 2 * n * p
    if used % 8:
        bad = stream.copy()
        bad[-1] |= np.uint8(1 << 7)
        with pytest.raises(ValidationError, match="padding bits"):
            parquet_v2.unpack_codes(bad, n, p)
    with pytest.raises(ValidationError, match="bytes"):
        parquet_v2.unpack_codes(np.append(stream, np.uint8(0)), n, p)


@pytest.mark.parametrize("edit,exc,needle", [
    (dict(importance=True), ConfigurationError, "does not support param dtype 'superblock'"),
    (dict(scheme="symmetric"), ValidationError, "needs the asymmetric scheme"),
])
def test_planner_plans_the_pipeline_cannot_honor(tmp_path, edit, exc, needle):
    """A custom planner asking for superblock with importance weights or the
    symmetric scheme gets an error naming the tensor, not other parameters."""
    from arrowquant.planning.plan import TensorPlan

    _sb_model(tmp_path)

    class Planner:
        def plan(self, tensors):
            out = {}
            for t in tensors:
                kw = dict(group_size=32, method="rtn", param_dtype="superblock",
                          scheme=edit.get("scheme", "asymmetric"))
                if edit.get("importance"):
                    kw["importance"] = np.ones(t.cols, np.float32)
                out[t.name] = TensorPlan(t.name, 4 if len(t.shape) > 1 else None, **kw)
            return out

    with pytest.raises(exc, match=needle):
        aq.quantize(tmp_path / "src", tmp_path / "out", planner=Planner(), progress=False)
    assert not (tmp_path / "out" / "metadata.json").exists()


# ---------------------------------------------------------------- generated hostile files


@pytest.fixture(scope="module")
def sb_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sbhostile")
    src = write_v1(root / "src", small_model())
    v2 = root / "v2"
    aq.quantize(src, v2, bits=4, group_size=32, param_dtype="superblock", chunk_size="2KiB",
                progress=False)
    return src, v2


def test_valid_superblock_model_passes_every_entry_point(sb_base, tmp_path):
    src, v2 = sb_base
    assert exercise_v2(v2, src, tmp_path) == {}


@fuzz(60)
@given(edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_superblock_random_byte_mutations(sb_base, tmp_path_factory, edits):
    src, v2 = sb_base
    mutate_and_exercise(v2, src, tmp_path_factory.mktemp("sbmut"), edits)


SB_FIELDS = {
    "param_code_bits": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.integers(-1, 10)),
    "superblock_groups": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1),
                                   st.integers(-1, 300)),
    "param_codes": st.one_of(st.none(), st.binary(max_size=80)),
    "scales": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(width=16)),
                                            max_size=12)),
    "zero_points": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(width=16)),
                                                 max_size=12)),
    "group_size": st.one_of(st.none(), st.integers(-2, 300)),
}


@fuzz(80)
@given(edits=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(sorted(SB_FIELDS))),
                      min_size=1, max_size=3).flatmap(
    lambda picks: st.tuples(st.just(picks), st.tuples(*[SB_FIELDS[f] for _, f in picks]))))
def test_superblock_generated_field_values(sb_base, tmp_path_factory, edits):
    """Superblock rows whose layout, units and code streams take generated
    values: named ArrowQuant errors or a clean read, nothing else."""
    src, v2 = sb_base
    d = copy_v2(v2, tmp_path_factory.mktemp("sbfields") / "m")
    picks, values = edits
    t = pq.read_table(d / "model.parquet")
    rows = t.to_pylist()
    for (row, name), value in zip(picks, values):
        rows[row % len(rows)][name] = value
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), d / "model.parquet",
                   row_group_size=1)
    exercise_v2(d, src, d.parent)


@pytest.mark.parametrize("group_size,cols", [(32, 256), (256, 256), (512, 100)])
def test_a_reader_predating_section_9_cannot_misread_a_superblock_row(tmp_path, group_size,
                                                                      cols):
    """A version-1 reader needs row_count * G zero points in every quantized
    row; a superblock row stores none, so that reader refuses it even where
    S == G (one group per row, or K = 1) and units would look like parameters."""
    x = _matrix(3, cols, seed=8)
    qt = engine.quantize_array(x, bits=4, group_size=group_size, method="mse",
                               param_dtype="superblock", name="w")
    d = write_model(tmp_path / "m", [_record(qt, 0, 3)])
    row = pq.read_table(d / "model.parquet").to_pylist()[0]
    G = groups_per_row(cols, group_size)
    assert row["zero_points"] == [] and 3 * G >= 1
    assert len(row["scales"]) == 2 * qt.superblock_scales.size
    np.testing.assert_array_equal(aq.load(d)["w"], engine.dequantize_array(qt))


def test_gguf_output_refuses_superblock_parameters(tmp_path):
    """GGUF has its own block types; asking for superblock parameters there is
    an error, not a silently different file."""
    src = tmp_path / "m"
    write_v1(src, {"w": _matrix(8, 64)})
    with pytest.raises(ConfigurationError, match="GGUF"):
        aq.quantize(str(src), str(tmp_path / "o.gguf"), output_format="gguf",
                    param_dtype="superblock", progress=False)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("code_bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("groups", [0, 1, 2, 3, 5, 64, 1001])
def test_engine_param_code_packer_equals_the_numpy_stream(code_bits, groups):
    from arrowquant.engine import core
    from arrowquant.engine.superblock import pack_codes, pack_param_codes
    from arrowquant.spec import param_code_bytes

    rng = np.random.default_rng(groups * 8 + code_bits)
    a = rng.integers(0, 256, groups, dtype=np.uint8)
    c = rng.integers(0, 256, groups, dtype=np.uint8)
    out = np.full(param_code_bytes(groups, code_bits), 0xAB, np.uint8)
    core.pack_param_codes(a, c, code_bits, out)
    assert out.tobytes() == pack_param_codes(a, c, code_bits).tobytes()
    if code_bits in (4, 6, 8):  # the pipeline's direct paths, masked to the width
        m = (1 << code_bits) - 1
        assert out.tobytes() == pack_codes(a & m, c & m, code_bits).tobytes()
