"""Importance-weighted parameters and channel equalization: the engine against
the numpy reference (bit for bit), the never-worse-than-rtn guarantee, chunk
invariance of equalization, and the measured gain on layers with planted
outlier input channels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arrowquant import dequantize_array, quantize_array
from arrowquant.errors import ValidationError
from arrowquant.engine.weighted import (SearchOptions, dequantize_weighted, equalization_scales,
                                        plan_equalization, quantize_importance_array,
                                        quantize_weighted, scales_from_spatial_json,
                                        weighted_output_error)
from arrowquant.reference import unpack
from arrowquant.reference.importance import quantize_importance as ref_quantize_importance
from arrowquant.spec import groups_per_row


def _lognormal_importance(rng: np.random.Generator, cols: int) -> np.ndarray:
    return rng.lognormal(0.0, 1.5, cols).astype(np.float32)


def _group_weighted_errors(x: np.ndarray, xhat: np.ndarray, w: np.ndarray, g: int) -> np.ndarray:
    rows, cols = x.shape
    e = (x.astype(np.float64) - xhat.astype(np.float64)) ** 2 * w.astype(np.float64)[None, :]
    G = groups_per_row(cols, g)
    pad = np.zeros((rows, G * g))
    pad[:, :cols] = e
    return pad.reshape(rows, G, g).sum(axis=2)


def test_f16_params_start_from_representable_rtn():
    # Groups far from 0 with a tiny spread: rtn's zero point -lo/scale passes
    # float16's range, and tiny groups whose scale rounds to 0 in float16. The
    # search must start from the stored-rtn rule (FORMAT.md section 7), not
    # from inf / 0 parameters.
    rng = np.random.default_rng(11)
    far = (1000.0 + rng.standard_normal((4, 64)) * 1e-3).astype(np.float32)
    tiny = (rng.standard_normal((4, 64)) * 1e-9).astype(np.float32)
    x = np.concatenate([far, tiny])
    w = _lognormal_importance(rng, 64)
    eng = quantize_importance_array(x, w, bits=4, group_size=32, param_dtype="float16")
    ref = ref_quantize_importance(x, w, bits=4, group_size=32, param_dtype="float16")
    np.testing.assert_array_equal(eng.scales.view(np.uint32), ref.scales.view(np.uint32))
    np.testing.assert_array_equal(eng.zero_points.view(np.uint32), ref.zero_points.view(np.uint32))
    np.testing.assert_array_equal(eng.data, ref.data)
    assert np.all(np.isfinite(eng.scales)) and np.all(eng.scales > 0)
    assert np.all(np.isfinite(eng.zero_points))
    xhat = dequantize_array(eng)
    assert np.all(np.isfinite(xhat))
    np.testing.assert_allclose(xhat[:4], x[:4], rtol=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("cols,group_size", [(96, 32), (100, 32), (7, 128)])
def test_engine_matches_reference_bit_for_bit(bits, scheme, cols, group_size):
    rng = np.random.default_rng(bits * 100 + cols)
    x = rng.standard_normal((9, cols)).astype(np.float32)
    x[:, 3 % cols] *= 10.0
    x[2, :] = 0.25  # a constant row: rtn is exact, nothing may change
    w = _lognormal_importance(rng, cols)
    w[0] = 0.0
    eng = quantize_importance_array(x, w, bits=bits, group_size=group_size, scheme=scheme)
    ref = ref_quantize_importance(x, w, bits=bits, group_size=group_size, scheme=scheme)
    np.testing.assert_array_equal(eng.scales.view(np.uint32), ref.scales.view(np.uint32))
    np.testing.assert_array_equal(eng.zero_points.view(np.uint32), ref.zero_points.view(np.uint32))
    np.testing.assert_array_equal(eng.data, ref.data)
    assert eng.method == ref.method == "importance"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reference_match_other_dtypes_and_f16_params(dtype):
    import ml_dtypes

    rng = np.random.default_rng(3)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x = rng.standard_normal((6, 80)).astype(np_dtype)
    w = _lognormal_importance(rng, 80)
    for pd in ("float32", "float16"):
        eng = quantize_importance_array(x, w, bits=4, group_size=64, param_dtype=pd)
        ref = ref_quantize_importance(x, w, bits=4, group_size=64, param_dtype=pd)
        np.testing.assert_array_equal(eng.scales.view(np.uint32), ref.scales.view(np.uint32))
        np.testing.assert_array_equal(eng.zero_points.view(np.uint32),
                                      ref.zero_points.view(np.uint32))
        np.testing.assert_array_equal(eng.data, ref.data)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_never_worse_than_rtn_on_any_group(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((32, 300)) * rng.uniform(0.1, 3.0, 300)).astype(np.float32)
    w = _lognormal_importance(rng, 300)
    g = 64
    rtn = dequantize_array(quantize_array(x, bits=bits, group_size=g, method="rtn", param_dtype="float32"))
    imp = dequantize_array(quantize_importance_array(x, w, bits=bits, group_size=g))
    e_rtn = _group_weighted_errors(x, rtn, w, g)
    e_imp = _group_weighted_errors(x, imp, w, g)
    assert np.all(e_imp <= e_rtn * (1 + 1e-12) + 1e-30)
    assert e_imp.sum() < 0.9 * e_rtn.sum()


def test_threads_do_not_change_the_result():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = _lognormal_importance(rng, 256)
    a = quantize_importance_array(x, w, bits=4, group_size=128, threads=1)
    b = quantize_importance_array(x, w, bits=4, group_size=128, threads=2)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.scales, b.scales)


def test_conv_importance_per_channel_expands_over_kernel():
    rng = np.random.default_rng(6)
    wconv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    per_channel = np.array([1.0, 50.0, 1.0, 0.1], dtype=np.float32)
    a = quantize_importance_array(wconv, per_channel, bits=4, group_size=18)
    b = quantize_importance_array(wconv, np.repeat(per_channel, 9), bits=4, group_size=18)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.shape == (8, 4, 3, 3)
    with pytest.raises(ValidationError, match="importance has 5 entries"):
        quantize_importance_array(wconv, np.ones(5), bits=4, group_size=18)


def test_bad_importance_is_rejected_with_the_column():
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValidationError, match="column 2"):
        quantize_importance_array(x, np.array([1, 1, -1, 1], dtype=np.float32), bits=4,
                                  group_size=4)
    with pytest.raises(ValidationError, match="NaN at index 5"):
        bad = np.arange(8, dtype=np.float32).reshape(2, 4)
        bad[1, 1] = np.nan
        quantize_importance_array(bad, np.ones(4, dtype=np.float32), bits=4, group_size=4,
                                  name="w")


# --------------------------------------------------------------------------
# synthetic layers with planted outlier input channels


def _outlier_layer(seed: int, inp: int = 1024, out: int = 256, n: int = 2048, outliers: int = 16):
    """A Linear layer W (out, in) and two activation sets (calibration,
    held-out) whose `outliers` input channels are 20-60x larger."""
    rng = np.random.default_rng(seed)
    std = np.ones(inp)
    idx = rng.choice(inp, outliers, replace=False)
    std[idx] = rng.uniform(20.0, 60.0, outliers)
    x_cal = rng.standard_normal((n, inp)) * std
    x_test = rng.standard_normal((n, inp)) * std
    w = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
    mean_sq = (x_cal**2).mean(axis=0).astype(np.float32)
    absmax = np.abs(x_cal).max(axis=0).astype(np.float32)
    return w, x_test, mean_sq, absmax


def test_importance_and_equalization_cut_output_error_on_outlier_channels():
    w, x_test, mean_sq, absmax = _outlier_layer(0)
    reductions = {}
    for bits in (4, 2):
        w_rtn = dequantize_array(quantize_array(w, bits=bits, group_size=128, method="rtn", param_dtype="float32"))
        qt, info = quantize_weighted(w, bits=bits, group_size=128, importance=mean_sq,
                                     equalization="search", act_absmax=absmax, name="fc")
        w_hat = dequantize_weighted(qt, info["spatial_quant_json"])
        e_rtn = weighted_output_error(w, w_rtn, x_test)
        e_cal = weighted_output_error(w, w_hat, x_test)
        reductions[bits] = 1.0 - e_cal / e_rtn
        print(f"INT{bits}: ||XW^T - XW_hat^T|| rtn {e_rtn:.2f}, importance+equalization "
              f"{e_cal:.2f} (alpha {info['equalization_alpha']}), reduction "
              f"{100 * reductions[bits]:.1f}%")
    assert reductions[4] >= 0.30
    assert reductions[2] > reductions[4]


def test_importance_alone_helps_and_equalization_does_not_hurt_the_proxy():
    w, x_test, mean_sq, absmax = _outlier_layer(1, inp=512, out=128)
    e = {}
    for eq in (None, "search"):
        qt, info = quantize_weighted(w, bits=4, group_size=128, importance=mean_sq,
                                     equalization=eq, act_absmax=absmax)
        e[eq] = weighted_output_error(w, dequantize_weighted(qt, info["spatial_quant_json"]),
                                      x_test)
        if eq == "search":
            errs = info["proxy_errors"]
            assert min(errs.values()) <= errs["none"]
    e_rtn = weighted_output_error(w, dequantize_array(quantize_array(w, bits=4, group_size=128, method="rtn", param_dtype="float32")),
                                  x_test)
    assert e[None] < 0.8 * e_rtn
    assert e["search"] <= e[None] * 1.05


def test_equalization_plan_is_the_same_for_every_chunking_and_recovers_the_weight():
    w, _, mean_sq, absmax = _outlier_layer(2, inp=256, out=300)
    rows, cols = w.shape

    def reader(r0: int, n: int) -> np.ndarray:
        return w[r0:r0 + n]

    p1 = plan_equalization(reader, rows, cols, mean_sq, absmax, bits=4, group_size=64,
                           chunk_rows=37, max_sample_rows=64)
    p2 = plan_equalization(reader, rows, cols, mean_sq, absmax, bits=4, group_size=64,
                           chunk_rows=300, max_sample_rows=64)
    assert p1.scales is not None and p1.alpha == p2.alpha
    np.testing.assert_array_equal(p1.scales, p2.scales)
    # Quantizing in two chunks with the plan's scales equals one pass.
    whole, _ = quantize_weighted(w, bits=4, group_size=64, importance=mean_sq,
                                 equalization=p1.scales)
    top, info = quantize_weighted(w[:100], bits=4, group_size=64, importance=mean_sq,
                                  equalization=p1.scales)
    bottom, _ = quantize_weighted(w[100:], bits=4, group_size=64, importance=mean_sq,
                                  equalization=p1.scales)
    np.testing.assert_array_equal(np.concatenate([top.data, bottom.data]), whole.data)
    # The JSON carries s exactly, and dividing by it recovers W_hat.
    s = scales_from_spatial_json(info["spatial_quant_json"])
    np.testing.assert_array_equal(s.view(np.uint32), p1.scales.view(np.uint32))
    doc = json.loads(info["spatial_quant_json"])
    assert doc["rule"] == "x_hat[r, c] / scales[c]" and len(doc["scales"]) == cols
    codes = unpack(whole.data, rows, cols, 4).astype(np.float32)
    G = groups_per_row(cols, 64)
    sc = np.repeat(whole.scales.reshape(rows, G), 64, axis=1)[:, :cols]
    zp = np.repeat(whole.zero_points.reshape(rows, G), 64, axis=1)[:, :cols]
    manual = ((codes - zp) * sc) / s[None, :]
    np.testing.assert_array_equal(dequantize_weighted(whole, info["spatial_quant_json"]), manual)
    # The reported error is about W itself, not about W * s.
    m = whole.metrics
    direct = np.sum((w.astype(np.float64) - manual) ** 2) / np.sum(w.astype(np.float64) ** 2)
    assert m.rel_mse == pytest.approx(direct, rel=1e-6)
    assert m.cosine > 0.98


def test_equalization_scales_formula():
    wmax = np.array([1.0, 2.0, 4.0, 4.0], dtype=np.float32)
    act = np.array([8.0, 2.0, 1.0, 1.0], dtype=np.float32)
    s = equalization_scales(wmax, act, 0.5)
    raw = np.sqrt(act) / np.sqrt(wmax)
    expect = raw / np.exp(np.mean(np.log(raw)))
    np.testing.assert_allclose(s, expect, rtol=1e-6)
    # Conv: act per input channel, weight absmax per column (2 columns each).
    s2 = equalization_scales(np.array([1.0, 3.0, 2.0, 2.0]), np.array([4.0, 1.0]), 1.0)
    np.testing.assert_allclose(s2, [2.0, 2.0, 0.5, 0.5], rtol=1e-6)
    # A dead channel gets a finite positive scale.
    s3 = equalization_scales(np.array([1.0, 1.0]), np.array([0.0, 1.0]), 1.0)
    assert np.all(np.isfinite(s3)) and np.all(s3 > 0)


def test_quantize_weighted_argument_errors():
    w = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValidationError, match="needs importance and act_absmax"):
        quantize_weighted(w, bits=4, group_size=8, equalization="search")
    with pytest.raises(ValidationError, match="equalization must be"):
        quantize_weighted(w, bits=4, group_size=8, importance=np.ones(8), equalization="awq")
    with pytest.raises(ValidationError, match="finite and > 0"):
        quantize_weighted(w, bits=4, group_size=8, equalization=np.zeros(8))


def test_float64_rows_are_accepted():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((5, 64))
    qt, info = quantize_weighted(w, bits=4, group_size=32, importance=np.ones(64))
    assert qt.dtype == "float32" and qt.shape == (5, 64) and info["method"] == "importance"


def test_search_options_change_the_search():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    w = _lognormal_importance(rng, 128)
    plain = quantize_importance_array(x, w, bits=4, group_size=128,
                                      options=SearchOptions(grid_steps=0, refit_iters=0))
    rtn = quantize_array(x, bits=4, group_size=128, method="rtn", param_dtype="float32")
    np.testing.assert_array_equal(plain.scales, rtn.scales)
    full = quantize_importance_array(x, w, bits=4, group_size=128)
    assert not np.array_equal(full.scales, rtn.scales)


def test_raw_bytes_with_dtype_and_shape_as_the_pipeline_passes_them():
    import ml_dtypes

    rng = np.random.default_rng(10)
    w = rng.standard_normal((6, 64)).astype(ml_dtypes.bfloat16)
    raw = w.view(np.uint16).reshape(-1).view(np.uint8)
    imp = _lognormal_importance(rng, 64)
    s = equalization_scales(np.abs(w.astype(np.float32)).max(0), imp, 0.5)
    a, _ = quantize_weighted(raw, dtype="bfloat16", shape=(6, 64), bits=4, group_size=32,
                             importance=imp, equalization=s)
    b, _ = quantize_weighted(w, bits=4, group_size=32, importance=imp, equalization=s)
    assert a.shape == (6, 64) and a.dtype == "bfloat16"
    np.testing.assert_array_equal(a.data, b.data)


def test_pipeline_with_calibrated_planner(tmp_path):
    """End to end: stats file -> CalibratedPlanner -> arrowquant.quantize ->
    arrowquant.load (which divides by the stored scales)."""
    st_np = pytest.importorskip("safetensors.numpy")
    import arrowquant
    from arrowquant.planning.calibrated import CalibratedPlanner
    from arrowquant.calibration import GroupStats, StatsRecorder, load_stats, write_stats
    from arrowquant.planning.plan import RulePlanner
    from arrowquant.sources import open_model
    import pyarrow as pa

    w, x_test, mean_sq, absmax = _outlier_layer(3, inp=256, out=64)
    model = tmp_path / "model"
    model.mkdir()
    st_np.save_file({"fc.weight": w, "fc.bias": np.zeros(64, np.float32)},
                    str(model / "model.safetensors"))
    f32 = pa.list_(pa.float32())
    table = pa.table({
        "layer": ["fc.weight"], "module_type": ["linear"], "channels": [256], "time_group": pa.array([0], pa.int32()),
        "count": [2048], "mean": pa.array([np.zeros(256, np.float32)], f32),
        "mean_sq": pa.array([mean_sq], f32), "absmax": pa.array([absmax], f32)})
    write_stats(table, tmp_path / "stats.parquet", {"num_time_groups": 1})
    stats = load_stats(tmp_path / "stats.parquet")
    errors = {}
    for label in ("rtn", "calibrated"):
        planner = RulePlanner(bits=4, group_size=64)
        if label == "calibrated":
            planner = CalibratedPlanner(planner, stats, model)  # source given as a path
        arrowquant.quantize(model, tmp_path / label, bits=4, group_size=64, planner=planner)
        w_hat = arrowquant.load(tmp_path / label)["fc.weight"]
        errors[label] = weighted_output_error(w, w_hat, x_test)
    report = json.loads((tmp_path / "calibrated" / "quantization_report.json").read_text())
    print("pipeline INT4 output error:", errors)
    assert errors["calibrated"] < 0.7 * errors["rtn"]
    assert "importance" in json.dumps(report)


def test_apply_calibration_on_existing_plans(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    from arrowquant.planning.calibrated import apply_calibration
    from arrowquant.calibration import write_stats
    from arrowquant.planning.plan import RulePlanner
    from arrowquant.sources import open_model
    import pyarrow as pa

    w, _, mean_sq, absmax = _outlier_layer(4, inp=128, out=32)
    conv = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    st_np.save_file({"fc.weight": w, "conv.weight": conv, "other.weight": w},
                    str(tmp_path / "model.safetensors"))
    f32 = pa.list_(pa.float32())
    cm = np.array([1.0, 100.0, 1.0, 1.0], np.float32)
    table = pa.table({
        "layer": ["conv.weight", "model.fc.weight"], "time_group": pa.array([0, 0], pa.int32()),
        "count": [10, 10], "mean": pa.array([np.zeros(4, np.float32), np.zeros(128, np.float32)], f32),
        "mean_sq": pa.array([cm, mean_sq], f32), "absmax": pa.array([np.sqrt(cm), absmax], f32)})
    write_stats(table, tmp_path / "s.parquet", {"num_time_groups": 1})
    with open_model(tmp_path / "model.safetensors") as src:
        plans = RulePlanner(bits=4, group_size=32).plan(src.tensors)
        apply_calibration(plans, src.tensors, tmp_path / "s.parquet", src)
    conv_plan = plans["conv.weight"]
    assert conv_plan.method == "importance" and conv_plan.importance.shape == (36,)
    assert conv_plan.importance[9] > conv_plan.importance[0]  # channel 1 spans columns 9..17
    assert plans["fc.weight"].importance.shape == (128,)   # resolved "model.fc.weight"
    assert plans["other.weight"].importance is None
    assert "no statistics" in plans["other.weight"].extra["calibration"]
    assert json.loads(plans["fc.weight"].time_aware_json)["num_time_groups"] == 1
