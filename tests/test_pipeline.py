"""The main job: model files in, ArrowQuant Parquet V2 out, streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrowquant as aq
from arrowquant import engine, reference
from arrowquant.errors import ArrowQuantError, MemoryBudgetError, ValidationError
from conftest import small_tensors, write_v1


def parquet_files(d: Path):
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet")


def test_v1_to_v2_matches_in_memory_engine_bit_for_bit(v1_model, tmp_path):
    src, tensors = v1_model
    out = tmp_path / "out"
    summary = aq.quantize(src, out, bits=4, group_size=32, progress=False)
    assert summary.tensors == len(tensors)
    assert summary.quantized_tensors == len(tensors) - 1  # the 1-D norm is kept
    model = aq.load(out)
    assert set(model) == set(tensors)
    for name, a in tensors.items():
        entry = model.info(name)
        if a.ndim < 2:
            assert entry.quant_type == "none"
            np.testing.assert_array_equal(model[name], a.astype(np.float32))
            continue
        # The pipeline's defaults (spec.default_spec(4)): rtn with superblock
        # parameters, groups of 32.
        expect = engine.quantize_array(a, bits=4)
        raw = model.raw(name)
        assert raw.method == "rtn" and raw.param_dtype == "superblock" and raw.group_size == 32
        assert raw.data.tobytes() == expect.data.tobytes()
        assert raw.scales.view(np.uint32).tolist() == expect.scales.view(np.uint32).tolist()
        assert raw.zero_points.view(np.uint32).tolist() == expect.zero_points.view(np.uint32).tolist()
        np.testing.assert_array_equal(model[name], engine.dequantize_array(expect))


def test_chunked_tensors_equal_unchunked(v1_model, tmp_path):
    src, tensors = v1_model
    aq.quantize(src, tmp_path / "one", bits=2, group_size=16, progress=False)
    aq.quantize(src, tmp_path / "many", bits=2, group_size=16, chunk_size="4KiB",
                shard_size="20KiB", progress=False)
    one, many = aq.load(tmp_path / "one"), aq.load(tmp_path / "many")
    assert max(len(many.info(n).chunks) for n in many) > 1
    assert len(parquet_files(tmp_path / "many")) > 1
    index = json.loads((tmp_path / "many" / "model.parquet.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(one[name], many[name])


def test_native_and_reference_write_identical_files(v1_model, tmp_path):
    src, _ = v1_model
    aq.quantize(src, tmp_path / "n", bits=8, group_size=64, progress=False)
    aq.quantize(src, tmp_path / "r", bits=8, group_size=64, engine="reference", progress=False)
    for a, b in zip(parquet_files(tmp_path / "n"), parquet_files(tmp_path / "r")):
        assert a.read_bytes() == b.read_bytes()


def test_v2_schema_metadata_and_report(v1_model, tmp_path):
    src, tensors = v1_model
    out = tmp_path / "out"
    # float16 parameters: format version 1 (the superblock default writes 2)
    aq.quantize(src, out, bits=4, param_dtype="float16", progress=False)
    pf = pq.ParquetFile(out / "model.parquet")
    kv = pf.schema_arrow.metadata
    assert kv[b"arrowquant.format"] == b"parquet-v2"
    assert kv[b"arrowquant.format_version"] == b"1"
    assert pf.num_row_groups == pf.metadata.num_rows  # one row group per chunk row
    rg = pf.metadata.row_group(0)
    names = [rg.column(i).path_in_schema for i in range(rg.num_columns)]
    for blob in ("data", "scales.list.element", "zero_points.list.element"):
        col = rg.column(names.index(blob))
        assert not col.is_stats_set, blob
    assert pf.schema_arrow.field("data").type == "large_binary"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "arrowquant-parquet-v2" and meta["modality"] == "text"
    assert meta["summary"]["tensors"] == len(tensors)
    report = json.loads((out / "quantization_report.json").read_text())
    entry = next(t for t in report["tensors"] if t["name"] == "lm_head.weight")
    for key in ("bits", "reason", "cosine", "rel_mse", "sqnr_db", "max_abs_error", "seconds"):
        assert key in entry
    assert not (out / ".arrowquant-staging").exists()


def test_existing_output_is_refused_then_overwritten(v1_model, tmp_path):
    src, _ = v1_model
    out = tmp_path / "out"
    aq.quantize(src, out, progress=False)
    with pytest.raises(ArrowQuantError, match="already exists"):
        aq.quantize(src, out, progress=False)
    aq.quantize(src, out, bits=8, overwrite=True, progress=False)
    assert aq.load(out).info("lm_head.weight").quant_type == "int8"


def test_overwrite_refuses_a_foreign_directory(v1_model, tmp_path):
    src, _ = v1_model
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ArrowQuantError, match="refusing to delete"):
        aq.quantize(src, foreign, overwrite=True, progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_nan_weights_name_the_tensor_and_leave_no_finished_output(tmp_path):
    tensors = small_tensors()
    bad = tensors["model.layers.0.self_attn.q_proj.weight"].copy()
    bad[3, 5] = np.nan
    tensors["model.layers.0.self_attn.q_proj.weight"] = bad
    src = write_v1(tmp_path / "v1", tensors)
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"q_proj.*NaN at index 197"):
        aq.quantize(src, out, progress=False)
    assert not (out / "metadata.json").exists()
    assert not (out / "model.parquet").exists()


@pytest.mark.parametrize("engine_name", ["native", "reference"])
@pytest.mark.parametrize("param_dtype", ["float16", "superblock"])
def test_nan_far_into_a_chunked_tensor_is_placed_in_the_whole_tensor_and_file(
        tmp_path, engine_name, param_dtype):
    """The engine sees one read unit at a time; the error still gives the
    position in the whole tensor and the file it came from."""
    from safetensors.numpy import save_file

    a = np.random.default_rng(0).standard_normal((1024, 256)).astype(np.float16)
    a[900, 7] = np.inf
    src = tmp_path / "m.safetensors"
    save_file({"w": a}, str(src))
    with pytest.raises(ValidationError,
                       match=rf"'w': Inf at index {900 * 256 + 7} \(row 900, column 7\) in "
                             rf".*m\.safetensors"):
        aq.quantize(src, tmp_path / "out", progress=False, max_memory="2MiB",
                    chunk_size="64KiB", engine=engine_name, param_dtype=param_dtype,
                    group_size=32)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_memory_budget_below_one_row_is_an_error_up_front(v1_model, tmp_path):
    src, _ = v1_model
    with pytest.raises(MemoryBudgetError, match="max-memory"):
        aq.quantize(src, tmp_path / "out", max_memory=200, progress=False)
    assert not (tmp_path / "out").exists()


def test_resume_after_a_partial_run_gives_identical_files(v1_model, tmp_path):
    src, tensors = v1_model
    full = tmp_path / "full"
    aq.quantize(src, full, bits=4, chunk_size="4KiB", progress=False)
    # Interrupt a run through its cancel hook after a few chunks.
    import threading

    cancel = threading.Event()
    seen = []

    def progress(msg, frac):
        seen.append(frac)
        if len(seen) == 5:
            cancel.set()

    part = tmp_path / "part"
    with pytest.raises(aq.CancelledError):
        aq.quantize(src, part, bits=4, chunk_size="4KiB", progress=progress, cancel=cancel)
    assert not (part / "metadata.json").exists()
    staged = list((part / ".arrowquant-staging").glob("*.part"))
    assert staged
    with pytest.raises(ArrowQuantError, match="already exists"):
        aq.quantize(src, part, bits=4, chunk_size="4KiB", progress=False)
    with pytest.raises(aq.ConfigurationError, match="other settings"):
        aq.quantize(src, part, bits=8, chunk_size="4KiB", resume=True, progress=False)
    aq.quantize(src, part, bits=4, chunk_size="4KiB", resume=True, progress=False)
    for a, b in zip(parquet_files(full), parquet_files(part)):
        assert a.read_bytes() == b.read_bytes()
    # Resuming a finished run changes nothing and reports what it holds.
    again = aq.quantize(src, part, bits=4, chunk_size="4KiB", resume=True, progress=False)
    assert again.tensors == len(tensors) and len(again.records) == len(tensors)
    for a, b in zip(parquet_files(full), parquet_files(part)):
        assert a.read_bytes() == b.read_bytes()


def test_second_concurrent_run_is_refused(v1_model, tmp_path):
    from arrowquant.run.staging import OutputLock

    src, _ = v1_model
    out = tmp_path / "out"
    out.mkdir()
    (out / ".arrowquant-staging").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
         str(out / ".arrowquant.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArrowQuantError, match="another arrowquant run"):
            aq.quantize(src, out, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is gone with it, and the run goes through.
    aq.quantize(src, out, resume=True, progress=False)
    assert (out / "metadata.json").exists()
    lock = OutputLock(out)
    lock.acquire()
    lock.release()


def test_fallback_redoes_a_layer_at_the_next_width(tmp_path):
    rng = np.random.default_rng(1)
    heavy = rng.standard_t(1.2, size=(64, 256)).astype(np.float32)  # extreme tails: INT2 fails
    smooth = rng.standard_normal((64, 256)).astype(np.float32)
    src = write_v1(tmp_path / "v1", {"heavy.weight": heavy, "smooth.weight": smooth})
    s = aq.quantize(src, tmp_path / "out", bits=2, fallback=True, min_cosine={2: 0.85, 4: 0.9, 8: 0.95},
                    method="rtn", param_dtype="float32", group_size=128, progress=False)
    by_name = {r.name: r for r in s.records}
    assert by_name["smooth.weight"].bits == 2
    assert by_name["heavy.weight"].bits in (4, 8)
    assert by_name["heavy.weight"].decisions and "redone at int4" in by_name["heavy.weight"].decisions[0]
    with pytest.raises(aq.QuantizationError, match="heavy.weight"):
        aq.quantize(src, tmp_path / "out2", bits=2, fail_fast=True, method="rtn",
                    param_dtype="float32", group_size=128, min_cosine={2: 0.85, 4: 0.9, 8: 0.95}, progress=False)


def test_fallback_on_chunked_tensor_probes_whole_tensor(tmp_path):
    rng = np.random.default_rng(2)
    gauss = rng.standard_normal((256, 128)).astype(np.float32)  # INT2 cosine ~0.90, INT4 ~0.995
    src = write_v1(tmp_path / "v1", {"heavy.weight": gauss})
    s = aq.quantize(src, tmp_path / "out", bits=2, fallback=True, chunk_size="16KiB",
                    method="rtn", param_dtype="float32", group_size=128,
                    min_cosine={2: 0.95, 4: 0.99, 8: 0.999}, progress=False)
    rec = s.records[0]
    assert rec.chunks > 1 and rec.bits == 4
    assert rec.cosine > 0.99 and rec.decisions[0].startswith("int2: cosine 0.8")
    model = aq.load(tmp_path / "out")
    assert {c.row_count for c in model.info("heavy.weight").chunks}
    assert model.info("heavy.weight").quant_type == f"int{rec.bits}"


def test_validate_and_inspect(v1_model, tmp_path):
    src, tensors = v1_model
    out = tmp_path / "out"
    aq.quantize(src, out, bits=8, progress=False)
    report = aq.validate(src, out)
    assert report.passed and len(report.layers) == len(tensors)
    strict = aq.validate(src, out, thresholds={8: 0.9999999})
    assert not strict.passed
    info = aq.inspect(out)
    assert info["num_tensors"] == len(tensors)
    q = next(t for t in info["tensors"] if t["name"] == "lm_head.weight")
    assert q["quant_type"] == "int8"
    # One group (64 cols) per row, its scale and zero point float16 by default.
    assert q["bits_per_weight"] == pytest.approx(8 + 2 * 16 / 64)


def test_cli_quantize_inspect_validate(v1_model, tmp_path):
    src, _ = v1_model
    out = tmp_path / "out"
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "arrowquant.cli", *a],
                                    capture_output=True, text=True, env=env)
    r = run("quantize", str(src), str(out), "--bits", "4", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["compression_ratio"] > 3
    r = run("quantize", str(src), str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("inspect", str(out))
    assert r.returncode == 0 and "lm_head.weight" in r.stdout and "int4" in r.stdout
    report = tmp_path / "report.md"
    r = run("validate", str(src), str(out), "--report", str(report))
    assert r.returncode == 0 and report.read_text().startswith("# Validation")
    r = run("validate", str(src), str(out), "--threshold", "4=0.99999")
    assert r.returncode == 1 and "FAIL" in r.stdout
    r = run("quantize", str(tmp_path / "missing"), str(tmp_path / "o2"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_v2_source_reads_rows_across_chunks(v1_model, tmp_path):
    from arrowquant.sources import open_model

    src, _ = v1_model
    out = tmp_path / "out"
    aq.quantize(src, out, bits=4, chunk_size="8KiB", progress=False)
    model = aq.load(out)
    name = "model.embed_tokens.weight"
    assert len(model.info(name).chunks) > 2
    whole = model[name]
    with open_model(out) as v2:
        assert v2.format == "arrowquant-parquet-v2"
        got = v2.read(name, 50, 300).view(np.float32).reshape(300, 64)
        np.testing.assert_array_equal(got, whole[50:350])
        norm = v2.read("model.layers.0.input_layernorm.weight").view(np.float16)
        np.testing.assert_array_equal(norm, np.ones(64, np.float16))
