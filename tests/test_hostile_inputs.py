"""Hostile input: damaged, inconsistent or malicious Parquet V1 / ArrowQuant V2
files, and weights at the edges of float arithmetic (NaN, Inf, subnormals,
zeros, the float16 maximum).

Every bad file must end in an ArrowQuant error (FormatError,
ModelNotFoundError, ShapeMismatchError, ValidationError) whose message names
the file, never in a crash, a hang, a huge allocation, a bare
pyarrow/numpy/KeyError/IndexError/TypeError, or a read outside the model
directory. The generated cases run under an address-space limit, so an
attempt to allocate for a claimed (not present) size fails the test."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import arrowquant as aq
from arrowquant.errors import (FormatError, MetadataError, ModelNotFoundError, ShapeMismatchError,
                               ValidationError)
from arrowquant.formats.gguf.export import export_gguf
from arrowquant.formats.v2_reader import QuantizedModel
from arrowquant.sources import ParquetV1Source, open_model
from conftest import V1_SCHEMA, write_v1

#: What a bad file may raise (MetadataError is a FormatError).
ALLOWED = (FormatError, ModelNotFoundError, ShapeMismatchError, ValidationError)
#: Generated cases per test; ARROWQUANT_HOSTILE_SCALE multiplies them for a longer run.
SCALE = float(os.environ.get("ARROWQUANT_HOSTILE_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=SCALE == 1,
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
#: Address space a reader may add while reading one of these small files.
HEADROOM = 1536 << 20


def small_model() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "a.weight": rng.standard_normal((40, 96)).astype(np.float16),  # 4 chunks of 10 rows
        "b.weight": rng.standard_normal((8, 70)).astype(np.float32),   # 7 + 1 rows, ragged groups
        "norm.weight": np.ones(96, np.float16),                          # stored unquantized
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = write_v1(root / "src", small_model())
    v2 = root / "v2"
    # float16 parameters: the per-group scales and zero points these tests tamper with
    aq.quantize(src, v2, bits=4, group_size=32, param_dtype="float16", method="mse",
                chunk_size="2KiB", progress=False)
    return src, v2


def copy_v2(v2: Path, dst: Path) -> Path:
    shutil.copytree(v2, dst)
    return dst


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """A limit on address space (current size + HEADROOM) and on time (30 s) while
    a hostile file is read: a reader that trusts a claimed size fails here with
    MemoryError (not an allowed error) instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm + HEADROOM if hard == resource.RLIM_INFINITY else min(hard, vm + HEADROOM)

    def on_alarm(*_):
        raise TimeoutError("reader took more than 30 s on a small hostile file")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _read_all_v2(d: Path) -> None:
    with aq.load(d) as m:
        for name in m:
            m[name]
            if m.info(name).quant_type != "none":
                m.raw(name)


def _read_all_source(d: Path) -> None:
    with open_model(d) as s:
        for t in s.tensors:
            s.read(t.name)


def exercise_v2(d: Path, src: Path, tmp: Path) -> Dict[str, str]:
    """Every reader entry point over the V2 directory `d`; returns the messages
    of the ArrowQuant errors raised; any other exception fails the test."""
    gguf = tmp / f"{d.name}.gguf"
    ops: List[tuple] = [
        ("QuantizedModel", lambda: [QuantizedModel(d)[n] for n in QuantizedModel(d)]),
        ("load", lambda: _read_all_v2(d)),
        ("inspect", lambda: aq.inspect(d)),
        ("ParquetV2Source", lambda: _read_all_source(d)),
        ("validate", lambda: aq.validate(src, d)),
        ("export_gguf", lambda: export_gguf(d, gguf, overwrite=True, bits=8)),
    ]
    return _run_ops(ops, d, src)


def exercise_v1(path: Path, tmp: Path) -> Dict[str, str]:
    gguf = tmp / f"{path.parent.name}.gguf"
    ops: List[tuple] = [
        ("open_model", lambda: _read_all_source(path)),
        ("inspect", lambda: aq.inspect(path)),
        ("export_gguf", lambda: export_gguf(path, gguf, overwrite=True, bits=8)),
    ]
    return _run_ops(ops, path, None)


def _run_ops(ops: List[tuple], d: Path, src: Optional[Path]) -> Dict[str, str]:
    messages: Dict[str, str] = {}
    for op, fn in ops:
        try:
            with bounded():
                fn()
        except ALLOWED as exc:
            msg = str(exc)
            named = str(d) in msg or str(d.parent) in msg or (src is not None and str(src) in msg)
            # A damaged value (not structure) that decodes to NaN/Inf is the
            # pipeline's weight check: it names the tensor and the element.
            named = named or (isinstance(exc, ValidationError) and
                              re.search(r"tensor '.*': (NaN|Inf) at", msg) is not None)
            assert named, f"{op}: message does not name the file: {msg}"
            messages[op] = msg
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{op} on {d}: {type(exc).__name__} is not an ArrowQuant error: {exc}")
    return messages


# ------------------------------------------------------------------ V2 table surgery


def v2_rows(d: Path) -> List[dict]:
    return pq.read_table(d / "model.parquet").to_pylist()


def write_v2_table(d: Path, table: pa.Table, name: str = "model.parquet") -> None:
    meta = {b"arrowquant.format": b"parquet-v2", b"arrowquant.format_version": b"1"}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    pq.write_table(table, d / name, row_group_size=1, compression="none")


def edit_rows(d: Path, fn: Callable[[List[dict]], List[dict]]) -> None:
    t = pq.read_table(d / "model.parquet")
    write_v2_table(d, pa.Table.from_pylist(fn(t.to_pylist()), schema=t.schema))


def set_field(name: str, chunk: int, **values) -> Callable[[List[dict]], List[dict]]:
    """Edits the `chunk`-th row of tensor `name`."""
    def fn(rows: List[dict]) -> List[dict]:
        k = 0
        for r in rows:
            if r["layer_name"] == name:
                if k == chunk:
                    r.update(values)
                k += 1
        return rows
    return fn


V2_OPS = {"QuantizedModel", "load", "inspect", "ParquetV2Source", "validate", "export_gguf"}


def expect_error(d: Path, src: Path, tmp: Path, kinds, *needles: str,
                 lazy: bool = True) -> Dict[str, str]:
    """Every entry point fails with an allowed error naming the file, and
    reading every tensor fails with one of `kinds` naming `needles`. `inspect`
    reads no tensor data, so damage inside a blob may pass it (`lazy`)."""
    messages = exercise_v2(d, src, tmp)
    must = V2_OPS - {"inspect"} if lazy else V2_OPS
    assert must <= set(messages), f"accepted by {sorted(must - set(messages))}: {messages}"
    with pytest.raises(kinds) as info:
        with bounded():
            _read_all_v2(d)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return messages


def test_valid_v2_passes_every_entry_point(base, tmp_path):
    src, v2 = base
    assert exercise_v2(v2, src, tmp_path) == {}
    assert aq.validate(src, v2).passed


# ------------------------------------------------------------------ generated V2 files


@fuzz(60)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_v2_truncated_file(base, tmp_path_factory, cut):
    src, v2 = base
    d = copy_v2(v2, tmp_path_factory.mktemp("trunc") / "m")
    blob = (d / "model.parquet").read_bytes()
    (d / "model.parquet").write_bytes(blob[: int(cut * len(blob))])
    assert set(exercise_v2(d, src, d.parent)) == V2_OPS


@fuzz(200)
@given(edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_v2_random_byte_mutations(base, tmp_path_factory, edits):
    """Damaged bytes anywhere (footer, page headers, values): an allowed error
    or a clean read; never anything else."""
    src, v2 = base
    mutate_and_exercise(v2, src, tmp_path_factory.mktemp("mut"), edits)


def mutate_and_exercise(v2: Path, src: Path, work: Path, edits) -> None:
    """A copy of the V2 model with model.parquet's byte at each fraction `pos`
    of its length set to `value`, read through every entry point."""
    d = copy_v2(v2, work / "m")
    blob = bytearray((d / "model.parquet").read_bytes())
    for pos, value in edits:
        blob[int(pos * len(blob))] = value
    (d / "model.parquet").write_bytes(bytes(blob))
    exercise_v2(d, src, d.parent)


FIELD_VALUES = {
    "row_start": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.integers(-2, 50)),
    "row_count": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.integers(-2, 50)),
    "num_params": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.integers(0, 5000)),
    "group_size": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.integers(-2, 200)),
    "shape": st.one_of(st.none(), st.lists(st.one_of(st.integers(-2**63, 2**63 - 1),
                                                     st.integers(0, 100)), max_size=5)),
    "quant_type": st.one_of(st.none(), st.sampled_from(["int2", "int3", "int4", "int8", "none",
                                                         "", "INT4"])),
    "dtype": st.one_of(st.none(), st.sampled_from(["float16", "float32", "bfloat16", "int8",
                                                   "float128", "", "float16\x00"])),
    "layer_name": st.one_of(st.none(), st.sampled_from(["a.weight", "b.weight", "norm.weight",
                                                        "", "x"])),
    "data": st.one_of(st.none(), st.binary(max_size=600)),
    "scales": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(width=32)),
                                            max_size=40)),
    "spatial_quant_json": st.one_of(st.none(), st.sampled_from(
        ['{"scales": [1, 2]}', "not json", "[]", '{"scales": "x"}', '{"scales": [0]}'])),
}


@fuzz(150)
@given(edits=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(sorted(FIELD_VALUES))),
                      min_size=1, max_size=3).flatmap(
    lambda picks: st.tuples(st.just(picks),
                            st.tuples(*[FIELD_VALUES[f] for _, f in picks]))))
def test_v2_generated_field_values(base, tmp_path_factory, edits):
    """Rows whose fields take generated (often inconsistent) values: the file
    is still valid Parquet, so only the V2 reader's checks stand in the way."""
    src, v2 = base
    d = copy_v2(v2, tmp_path_factory.mktemp("fields") / "m")
    picks, values = edits

    def fn(rows: List[dict]) -> List[dict]:
        for (row, field), value in zip(picks, values):
            rows[row][field] = value
        return rows
    edit_rows(d, fn)
    exercise_v2(d, src, d.parent)


# ------------------------------------------------------------------ hand-made V2 cases


@pytest.mark.parametrize("column", ["layer_name", "row_start", "row_count", "shape", "dtype",
                                    "data", "num_params", "quant_type", "group_size", "scales",
                                    "zero_points"])
def test_v2_missing_column(base, tmp_path, column):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    write_v2_table(d, pq.read_table(d / "model.parquet").drop_columns([column]))
    expect_error(d, src, tmp_path, FormatError, "model.parquet", repr(column))


@pytest.mark.parametrize("column,array", [
    ("row_start", lambda n: pa.array(["0"] * n)),
    ("shape", lambda n: pa.array([["40", "96"]] * n)),
    ("data", lambda n: pa.array(["x"] * n)),
    ("scales", lambda n: pa.array([[1.0]] * n, pa.list_(pa.float64()))),
    ("zero_points", lambda n: pa.array([[1]] * n, pa.list_(pa.int32()))),
    ("quant_type", lambda n: pa.array([4] * n, pa.int64())),
    ("layer_name", lambda n: pa.array([b"a"] * n, pa.binary())),
])
def test_v2_wrong_column_type(base, tmp_path, column, array):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    t = pq.read_table(d / "model.parquet")
    i = t.schema.get_field_index(column)
    write_v2_table(d, t.set_column(i, column, array(t.num_rows)))
    expect_error(d, src, tmp_path, FormatError, "model.parquet", repr(column))


@pytest.mark.parametrize("field", ["layer_name", "row_start", "row_count", "shape", "dtype",
                                   "num_params", "quant_type", "group_size", "data", "scales",
                                   "zero_points"])
def test_v2_null_values(base, tmp_path, field):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    edit_rows(d, set_field("a.weight", 1, **{field: None}))
    expect_error(d, src, tmp_path, ALLOWED, "model.parquet")


def test_v2_null_inside_scales_list(base, tmp_path):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    rows = v2_rows(d)
    scales = rows[2]["scales"]
    scales[3] = None
    edit_rows(d, set_field("a.weight", 2, scales=scales))
    expect_error(d, src, tmp_path, ValidationError, "'a.weight'", "scales[3]")


@pytest.mark.parametrize("edit,kind,needle", [
    (set_field("a.weight", 0, num_params=3841), ShapeMismatchError, "num_params"),
    (set_field("a.weight", 0, shape=[41, 96]), ShapeMismatchError, "'a.weight'"),
    (set_field("b.weight", 0, shape=[7, 80], num_params=560), FormatError, "disagrees"),
    (set_field("a.weight", 1, data=b"\x11" * 479), ShapeMismatchError, "479 data bytes"),
    (set_field("a.weight", 1, data=b"\x11" * 481), ShapeMismatchError, "481 data bytes"),
    (set_field("norm.weight", 0, data=b"\x00" * 190), ShapeMismatchError, "'norm.weight'"),
    (set_field("a.weight", 3, scales=[0.1] * 29), ShapeMismatchError, "29 scales"),
    (set_field("b.weight", 1, zero_points=[1.0] * 4), ShapeMismatchError, "zero_points"),
    (set_field("a.weight", 0, quant_type="int3"), FormatError, "'int3'"),
    (set_field("a.weight", 0, group_size=0), FormatError, "group_size 0"),
    (set_field("a.weight", 0, group_size=-32), FormatError, "group_size -32"),
    (set_field("a.weight", 1, dtype="float128"), FormatError, "float128"),
    (set_field("a.weight", 1, row_start=5), FormatError, "overlap"),
    (set_field("a.weight", 1, row_start=11), FormatError, "gap"),
    (set_field("a.weight", 3, row_start=35), ShapeMismatchError, "outside"),
    (set_field("a.weight", 3, row_count=-10), ShapeMismatchError, "outside"),
    (set_field("a.weight", 2, row_start=-10, row_count=20), ShapeMismatchError, "outside"),
    (set_field("a.weight", 3, row_count=0), FormatError, "'a.weight'"),
    (set_field("a.weight", 2, shape=[20, 192], num_params=3840), FormatError, "disagrees"),
    (set_field("a.weight", 2, group_size=64), FormatError, "disagrees"),
    (set_field("a.weight", 0, spatial_quant_json="{bad"), FormatError, "spatial_quant_json"),
    (set_field("a.weight", 0, spatial_quant_json='{"scales": [1.0, 2.0]}'), ShapeMismatchError,
     "2 scales for 96 columns"),
    (set_field("a.weight", 0, scheme="log"), FormatError, "'log'"),
])
def test_v2_inconsistent_rows(base, tmp_path, edit, kind, needle):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    edit_rows(d, edit)
    expect_error(d, src, tmp_path, kind, "model.parquet", needle)


def test_v2_duplicate_name_with_other_shape_across_files(base, tmp_path):
    """Chunks of one name spread over two shards, the second with another shape."""
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    t = pq.read_table(d / "model.parquet")
    (d / "model.parquet").unlink()
    write_v2_table(d, t.slice(0, 2), "model-00001.parquet")
    rows = t.slice(2).to_pylist()
    rows[0]["shape"] = [20, 192]
    write_v2_table(d, pa.Table.from_pylist(rows, schema=t.schema), "model-00002.parquet")
    wm = {"a.weight": "model-00001.parquet", "b.weight": "model-00002.parquet",
          "norm.weight": "model-00002.parquet"}
    (d / "model.parquet.index.json").write_text(json.dumps({"weight_map": wm}))
    expect_error(d, src, tmp_path, FormatError, "model-00002.parquet", "'a.weight'")


@pytest.mark.parametrize("shape,num_params,needle", [
    ([2**40, 2**40], 2**62, "2^62"),                 # product beyond int64
    ([2**21, 2**21, 2**21], 2**63 - 1, "2^62"),      # product exactly 2^63
    ([2**31] * 4, 0, "2^62"),                        # product wraps to 0 modulo 2^64
    ([1, 2**40], 2**40, "data column holds"),        # consistent, but not in the file
    ([1, 2**34, 3], 3 * 2**34, "data column holds"),
])
def test_v2_huge_shapes_allocate_nothing(base, tmp_path, shape, num_params, needle):
    """Huge claimed shapes are refused at open, from the footer, before any
    buffer is sized from them (export_gguf sizes its row buffer from the shape)."""
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    edit_rows(d, set_field("norm.weight", 0, shape=shape, num_params=num_params))
    expect_error(d, src, tmp_path, ShapeMismatchError, "'norm.weight'", needle)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_v2_float16_scales_not_finite(base, tmp_path, bad):
    """FORMAT.md section 5: readers accept list<float16> parameters; a
    non-finite one is an error naming the tensor and the index."""
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    t = pq.read_table(d / "model.parquet")
    for col in ("scales", "zero_points"):
        i = t.schema.get_field_index(col)
        t = t.set_column(i, col, t.column(col).cast(pa.list_(pa.float16())))
    write_v2_table(d, t)
    assert exercise_v2(d, src, tmp_path) == {}  # float16 parameters read fine
    rows = t.to_pylist()
    rows[1]["scales"][7] = float(bad)
    write_v2_table(d, pa.Table.from_pylist(rows, schema=t.schema))
    expect_error(d, src, tmp_path, ValidationError, "'a.weight'", "scales[7]")


def test_v2_missing_format_metadata(base, tmp_path):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    t = pq.read_table(d / "model.parquet").replace_schema_metadata(None)
    pq.write_table(t, d / "model.parquet", row_group_size=1)
    expect_error(d, src, tmp_path, FormatError, "model.parquet", "arrowquant.format")


# ------------------------------------------------------------------ index and metadata


def sharded(v2: Path, d: Path, files: Dict[str, str]) -> Path:
    d = copy_v2(v2, d)
    (d / "model.parquet.index.json").write_text(json.dumps(
        {"metadata": {"format": "arrowquant-parquet-v2"}, "weight_map": files}))
    return d


@pytest.mark.parametrize("target,kind", [
    ("missing.parquet", ModelNotFoundError),
    ("../outside/model.parquet", FormatError),
    ("ABSOLUTE", FormatError),
    ("sub/../../outside/model.parquet", FormatError),
    ("", FormatError),
    (17, FormatError),
    ("SYMLINK", FormatError),
    ("SYMLINK_DIR/model.parquet", FormatError),
])
def test_v2_index_pointing_outside_or_missing(base, tmp_path, target, kind):
    """The targets outside the directory are valid V2 files: reading one would
    make the load succeed, so the error proves nothing outside was read."""
    src, v2 = base
    outside = copy_v2(v2, tmp_path / "outside")
    d = tmp_path / "m"
    if target == "ABSOLUTE":
        target = str(outside / "model.parquet")
    d = sharded(v2, d, {"a.weight": "model.parquet", "b.weight": "model.parquet",
                        "norm.weight": "model.parquet"})
    if target == "SYMLINK":
        (d / "link.parquet").symlink_to(outside / "model.parquet")
        target = "link.parquet"
    if target == "SYMLINK_DIR/model.parquet":
        (d / "SYMLINK_DIR").symlink_to(outside)
    wm = {"a.weight": target, "b.weight": "model.parquet", "norm.weight": "model.parquet"}
    (d / "model.parquet.index.json").write_text(json.dumps({"weight_map": wm}))
    messages = expect_error(d, src, tmp_path, kind, "model.parquet.index.json", lazy=False)
    assert all("index.json" in m for m in messages.values()), messages


def test_v2_model_parquet_symlink_escaping(base, tmp_path):
    src, v2 = base
    outside = copy_v2(v2, tmp_path / "outside")
    d = copy_v2(v2, tmp_path / "m")
    (d / "model.parquet").unlink()
    (d / "model.parquet").symlink_to(outside / "model.parquet")
    expect_error(d, src, tmp_path, FormatError, "outside the model directory")


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": []}', '{"weight_map": {"a": null}}',
                                   '{"other": 1}'])
def test_v2_index_malformed(base, tmp_path, index):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    (d / "model.parquet.index.json").write_text(index)
    expect_error(d, src, tmp_path, FormatError, "model.parquet.index.json")


def test_v2_index_and_files_disagree(base, tmp_path):
    src, v2 = base
    d = sharded(v2, tmp_path / "m", {"a.weight": "model.parquet", "ghost.weight": "model.parquet"})
    expect_error(d, src, tmp_path, FormatError, "'ghost.weight'")


@pytest.mark.parametrize("text", ["{", "[1, 2]", '"text"', "\xff\xfe"])
def test_v2_metadata_malformed_in_reader(base, tmp_path, text):
    """QuantizedModel (the reader behind load) names metadata.json."""
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    (d / "metadata.json").write_text(text, encoding="latin-1")
    with pytest.raises(MetadataError, match="metadata.json"):
        QuantizedModel(d)
    # Without a readable metadata.json the directory is not recognised as V2;
    # the V1 reader refuses a V2 file instead of misreading it.
    with pytest.raises(FormatError, match=r"metadata\.json"):
        open_model(d)


def test_v2_metadata_malformed_through_load(base, tmp_path):
    src, v2 = base
    d = copy_v2(v2, tmp_path / "m")
    (d / "metadata.json").write_text("{")
    with pytest.raises(MetadataError, match="metadata.json"):
        aq.load(d)


# ------------------------------------------------------------------ Parquet V1


def write_v1_rows(path: Path, rows: List[dict], row_group_size: int = 1,
                  schema: pa.Schema = V1_SCHEMA) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path / "model.parquet",
                   row_group_size=row_group_size)
    return path / "model.parquet"


def v1_rows() -> List[dict]:
    return [{"layer_name": n, "shape": list(a.shape), "dtype": a.dtype.name,
             "data": a.tobytes(), "num_params": int(a.size)} for n, a in small_model().items()]


def expect_v1_error(path: Path, tmp: Path, kind, *needles: str) -> None:
    messages = exercise_v1(path, tmp)
    assert set(messages) >= {"open_model", "export_gguf"}, messages
    with pytest.raises(kind) as info:
        _read_all_source(path)
    for needle in (str(path), *needles):
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", ["int8", "float64", "float8_e4m3fn", "", "FLOAT32", "float32 ",
                                   "float16\x00", "\u00e9"])
def test_v1_dtype_not_allowed(tmp_path, dtype):
    rows = v1_rows()
    rows[1]["dtype"] = dtype
    expect_v1_error(write_v1_rows(tmp_path / "m", rows), tmp_path, FormatError, repr(dtype))


@pytest.mark.parametrize("field,value,kind,needle", [
    ("num_params", 3841, ShapeMismatchError, "num_params"),
    ("num_params", -1, ShapeMismatchError, "num_params"),
    ("shape", [-40, -96], ShapeMismatchError, "invalid shape"),
    ("shape", [2**40, 2**40], ShapeMismatchError, "2^62"),
    ("data", b"\x00" * 7679, FormatError, "7679 data bytes"),
    ("data", b"\x00" * 7681, FormatError, "7681 data bytes"),
    ("data", None, ShapeMismatchError, "data column holds"),
    ("layer_name", None, FormatError, "null"),
])
def test_v1_inconsistent_rows(tmp_path, field, value, kind, needle):
    rows = v1_rows()
    rows[0][field] = value
    expect_v1_error(write_v1_rows(tmp_path / "m", rows), tmp_path, kind, needle)


def test_v1_huge_shape_consistent_with_num_params_allocates_nothing(tmp_path):
    rows = v1_rows()
    rows[2].update(shape=[1, 2**40], num_params=2**40)
    expect_v1_error(write_v1_rows(tmp_path / "m", rows), tmp_path, ShapeMismatchError,
                    "data column holds")


def test_v1_duplicate_names(tmp_path):
    rows = v1_rows()
    rows[2]["layer_name"] = rows[0]["layer_name"]
    rows[2]["shape"] = [96, 1]
    expect_v1_error(write_v1_rows(tmp_path / "m", rows), tmp_path, FormatError, "duplicate",
                    "'a.weight'")


@pytest.mark.parametrize("column,array", [
    ("shape", lambda n: pa.array([["1"]] * n)),
    ("num_params", lambda n: pa.array(["1"] * n)),
    ("data", lambda n: pa.array([1] * n, pa.int64())),
])
def test_v1_wrong_column_type(tmp_path, column, array):
    path = write_v1_rows(tmp_path / "m", v1_rows())
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, array(t.num_rows)), path)
    expect_v1_error(path, tmp_path, FormatError, repr(column))


@pytest.mark.parametrize("content", [b"", b"PAR1", b"not parquet at all\n" * 10,
                                     b"PAR1" + b"\x00" * 64 + b"PAR1"])
def test_v1_not_a_parquet_file(tmp_path, content):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.parquet"
    path.write_bytes(content)
    expect_v1_error(path, tmp_path, FormatError)


def test_v1_several_tensors_per_row_group_still_work(tmp_path):
    """FORMAT.md section 4: readers accept any grouping."""
    one = write_v1(tmp_path / "one", small_model())
    many = write_v1_rows(tmp_path / "many", v1_rows(), row_group_size=2)
    assert pq.ParquetFile(many).num_row_groups == 2
    with open_model(many) as s:
        for name, a in small_model().items():
            assert s.read(name).tobytes() == a.tobytes()
    aq.quantize(one, tmp_path / "q1", bits=4, group_size=32, progress=False)
    aq.quantize(many, tmp_path / "q2", bits=4, group_size=32, progress=False)
    a, b = aq.load(tmp_path / "q1"), aq.load(tmp_path / "q2")
    for name in small_model():
        assert np.array_equal(a[name], b[name])


def test_v1_file_is_v2_is_refused(base, tmp_path):
    src, v2 = base
    with pytest.raises(FormatError, match="V2"):
        ParquetV1Source([v2 / "model.parquet"], v2)


@fuzz(150)
@given(keep=st.one_of(st.none(), st.floats(0.0, 1.0, exclude_max=True)),
       edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)),
                      max_size=6))
@example(keep=None, edits=[(0.7103502444390262, 128)])  # found: invalid UTF-8 in a name
@example(keep=None, edits=[(0.125, 124)])               # found: a weight decoding to Inf
@example(keep=None, edits=[(0.923828125, 128)])         # found: invalid UTF-8 in the footer
@example(keep=None, edits=[(0.759765625, 128)])         # found: ... in a schema column path
def test_v1_truncated_and_mutated(tmp_path_factory, keep, edits):
    d = tmp_path_factory.mktemp("v1fuzz")
    path = write_v1_rows(d / "m", v1_rows(), row_group_size=2)
    blob = bytearray(path.read_bytes())
    for pos, value in edits:
        blob[int(pos * len(blob))] = value
    if keep is not None:
        blob = blob[: int(keep * len(blob))]
    path.write_bytes(bytes(blob))
    exercise_v1(path, d)


# ------------------------------------------------------------------ special values


def write_safetensors(path: Path, tensors: Dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path / "model.safetensors"


def write_input(kind: str, path: Path, tensors: Dict[str, np.ndarray]) -> Path:
    return write_safetensors(path, tensors) if kind == "safetensors" else write_v1(path, tensors)


@pytest.mark.parametrize("kind", ["safetensors", "v1"])
@pytest.mark.parametrize("bad,label", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_inf_rejected_naming_tensor_and_index(tmp_path, kind, bad, label, dtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(dtype)
    w[3, 5] = bad
    src = write_input(kind, tmp_path / "src", {"good.weight": np.ones((4, 64), dtype),
                                               "bad.weight": w})
    before = {p: p.read_bytes() for p in Path(src if src.is_dir() else src.parent).iterdir()}
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as info:
        aq.quantize(src, out, bits=4, group_size=32, progress=False)
    msg = str(info.value)
    assert "'bad.weight'" in msg and label in msg and "197" in msg, msg
    assert not (out / "metadata.json").exists()
    assert not any(p.suffix == ".parquet" for p in out.iterdir()), list(out.iterdir())
    assert {p: p.read_bytes() for p in before} == before  # input untouched
    gguf = tmp_path / "x.gguf"
    with pytest.raises(ValidationError, match=r"'bad.weight'.*197"):
        export_gguf(src, gguf, bits=4)
    assert not gguf.exists() and list(tmp_path.glob("x.gguf*")) == []


@pytest.mark.parametrize("method,param_dtype", [("rtn", "float32"), ("mse", "float16")])
@pytest.mark.parametrize("kind", ["safetensors", "v1"])
def test_zero_subnormal_and_float16_max_through_pipeline(tmp_path, kind, method, param_dtype):
    """All-zero tensors are exact (cosine 1.0 by convention). Subnormal-only
    groups: at rtn/float32 the degenerate-group rule of FORMAT.md section 6
    (scale 1, zero point -lo, codes rint(x - lo)) brings each group back as
    its minimum; at the defaults (mse, float16 parameters, section 7) -lo
    rounds to a float16 0 and the group comes back as 0. Either way finite,
    within the values' own magnitude. float16 values at +-65504 stay finite."""
    sub = (np.float32(1e-42) * np.arange(1, 129, dtype=np.float32)).reshape(2, 64)
    f16max = np.tile(np.array([65504, -65504, 0, 1024], np.float16), (4, 16))
    tensors = {"zero.weight": np.zeros((8, 64), np.float16),
               "negzero.weight": np.full((4, 64), -0.0, np.float32),
               "sub.weight": sub,
               "f16max.weight": f16max}
    src = write_input(kind, tmp_path / "src", tensors)
    opts = dict(bits=4, group_size=32, method=method, param_dtype=param_dtype, progress=False)
    s = aq.quantize(src, tmp_path / "out", **opts)
    rec = {r.name: r for r in s.records}
    m = aq.load(tmp_path / "out")
    for name in ("zero.weight", "negzero.weight"):
        assert np.array_equal(m[name], np.zeros(tensors[name].shape, np.float32))
        assert rec[name].cosine == 1.0 and rec[name].max_abs_error == 0.0
    x = m["sub.weight"]
    assert np.isfinite(x).all() and np.isfinite(rec["sub.weight"].cosine)
    assert np.abs(x - sub).max() <= np.abs(sub).max()
    groups = sub.reshape(2, 2, 32)
    if method == "rtn":
        expect = np.repeat(groups.min(axis=2), 32, axis=1).reshape(2, 64)  # x_hat = lo
        assert np.array_equal(x, expect)
        raw = m.raw("sub.weight")
        assert np.all(raw.scales == 1.0)
        assert np.array_equal(raw.zero_points, -groups.min(axis=2).ravel())
    y = m["f16max.weight"]
    assert np.isfinite(y).all()
    if method == "rtn":  # half a quantization step
        assert np.abs(y - f16max.astype(np.float32)).max() <= 0.51 * 65504 * 2 / 15
    assert rec["f16max.weight"].cosine > 0.99
    # The numpy reference agrees bit for bit on these edge values.
    s2 = aq.quantize(src, tmp_path / "ref", engine="reference", **opts)
    r = aq.load(tmp_path / "ref")
    for name in tensors:
        assert np.array_equal(r[name], m[name]), name
    # (metrics are summed in a different order: equal to rounding)
    assert [x.cosine for x in s2.records] == pytest.approx([x.cosine for x in s.records], rel=1e-9)
    if method == "rtn":
        # GGUF: the same edge values stay finite; zeros exact.
        rep = export_gguf(src, tmp_path / "x.gguf", bits=4)
        det = {t["name"]: t for t in rep["tensors_detail"]}
        assert det["zero.weight"]["cosine"] == 1.0 and det["zero.weight"]["max_abs_error"] == 0.0
        assert all(np.isfinite(t["max_abs_error"]) for t in det.values())
        assert det["f16max.weight"]["max_abs_error"] <= 65504 / 8 + 1e-3  # one Q4_0 step


def test_export_gguf_from_v2_with_edge_values(tmp_path):
    tensors = {"zero.weight": np.zeros((8, 64), np.float16),
               "f16max.weight": np.tile(np.array([65504, -65504], np.float16), (4, 32))}
    src = write_v1(tmp_path / "src", tensors)
    aq.quantize(src, tmp_path / "v2", bits=8, group_size=32, progress=False)  # defaults: mse, f16
    rep = export_gguf(tmp_path / "v2", tmp_path / "x.gguf", bits=8)
    det = {t["name"]: t for t in rep["tensors_detail"]}
    assert det["zero.weight"]["cosine"] == 1.0
    assert det["f16max.weight"]["cosine"] > 0.999


def test_gguf_export_float16_block_scale_overflow_is_an_error(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * 1e7
    src = write_v1(tmp_path / "src", {"big.weight": w})
    with pytest.raises(ValidationError, match="'big.weight'"):
        export_gguf(src, tmp_path / "x.gguf", bits=8)
    assert not (tmp_path / "x.gguf").exists()


def test_metrics_of_an_overflowed_reconstruction_do_not_raise():
    from arrowquant.engine.metrics import ErrorSums

    m = ErrorSums(2.4562754757070504e16, np.inf, np.inf, np.inf, np.inf, 3840).metrics()
    assert not m.cosine >= 1.0  # Inf / Inf is NaN: must not be clamped to a perfect 1.0
    assert m.sqnr_db == -np.inf


def test_validate_against_an_original_of_other_shapes(tmp_path):
    a = write_v1(tmp_path / "a", {"w": np.ones((8, 64), np.float32)})
    b = write_v1(tmp_path / "b", {"w": np.ones((4, 64), np.float32)})
    aq.quantize(b, tmp_path / "q", bits=4, group_size=32, progress=False)
    with pytest.raises(ShapeMismatchError, match="'w'"):
        aq.validate(a, tmp_path / "q")


# ------------------------------------------------------------------ memory budget (CLI)


def test_cli_memory_budget_below_one_chunk_exits_2_without_output(tmp_path):
    src = write_v1(tmp_path / "src", small_model())
    out = tmp_path / "out"
    # The arrowquant under test: installed in CI, python/ in a dev tree.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(aq.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))
        if p)}
    r = subprocess.run([sys.executable, "-m", "arrowquant.cli", "quantize", str(src), str(out),
                        "--max-memory", "200"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--max-memory" in r.stderr and "cannot hold" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
