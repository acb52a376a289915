"""The mse method and float16 parameters (issue 8): engine and numpy reference
agree bit for bit, mse is never worse than rtn on any group, and float16
parameters dequantize exactly as stored."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrowquant import engine, reference
from arrowquant.errors import ValidationError
from arrowquant.reference.search import round_scale_f16
from conftest import family_matrix

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


_matrix = family_matrix


FAMILIES = ["gauss", "student", "outlier", "offset", "ties"]


def _group_errors(x: np.ndarray, xhat: np.ndarray, g: int) -> np.ndarray:
    """Squared error per (row, group), in float64."""
    rows, cols = x.shape
    G = -(-cols // g)
    e = np.zeros((rows, G * g))
    e[:, :cols] = (x.astype(np.float64) - xhat.astype(np.float64)) ** 2
    return e.reshape(rows, G, g).sum(axis=2)


def _same(a, b) -> None:
    assert a.scales.dtype == b.scales.dtype == np.float32
    np.testing.assert_array_equal(a.scales.view(np.uint32), b.scales.view(np.uint32))
    np.testing.assert_array_equal(a.zero_points.view(np.uint32), b.zero_points.view(np.uint32))
    np.testing.assert_array_equal(a.data, b.data)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    group_size=st.sampled_from([1, 5, 8, 16, 32, 33, 64, 128, 256]),
    bits=st.sampled_from([2, 4, 8]),
    scheme=st.sampled_from(["asymmetric", "symmetric"]),
    param_dtype=st.sampled_from(["float32", "float16"]),
    family=st.sampled_from(FAMILIES),
)
def test_engine_matches_reference_bit_for_bit(seed, rows, cols, group_size, bits, scheme,
                                              param_dtype, family):
    x = _matrix(seed, rows, cols, family)
    kw = dict(bits=bits, group_size=group_size, scheme=scheme, method="mse",
              param_dtype=param_dtype)
    ref = reference.quantize_array(x, **kw)
    _same(engine.quantize_array(x, **kw), ref)
    _same(engine.quantize_array(x, force_scalar=True, threads=1, **kw), ref)


def _outcome(impl, x, **kw):
    """(scales, zero points, data) or the error's class and message up to the
    parameter values (printed differently by C++ and Python)."""
    try:
        qt = impl.quantize_array(x, **kw)
    except Exception as exc:  # compared below
        return type(exc).__name__, str(exc).split("(")[0]
    return qt.scales.tobytes(), qt.zero_points.tobytes(), qt.data.tobytes()


@pytest.mark.parametrize("magnitude", [1e-41, 1e-30, 1e30, 1e37, 7e4])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_engine_matches_reference_at_extreme_magnitudes(magnitude, scheme):
    """Subnormal groups, scales that overflow float16, ranges near float32's
    limit: same parameters, or the same error, from both."""
    rng = np.random.default_rng(int(np.log10(magnitude)) + 50)
    x = (rng.standard_normal((3, 40)) * magnitude).astype(np.float32)
    x[2, :8] = np.float32(magnitude)  # a constant group
    for bits in (2, 4, 8):
        for method in ("rtn", "mse"):
            for param_dtype in ("float32", "float16"):
                kw = dict(bits=bits, group_size=8, scheme=scheme, method=method,
                          param_dtype=param_dtype)
                assert _outcome(engine, x, **kw) == _outcome(reference, x, **kw), kw


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_engine_matches_reference_for_narrow_inputs(dtype):
    import ml_dtypes

    x = _matrix(3, 8, 200, "student")
    narrow = x.astype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
    for param_dtype in ("float32", "float16"):
        kw = dict(bits=4, group_size=64, method="mse", param_dtype=param_dtype)
        _same(engine.quantize_array(narrow, **kw), reference.quantize_array(narrow, **kw))


@pytest.mark.parametrize("param_dtype", ["float32", "float16"])
def test_rtn_float16_matches_reference(param_dtype):
    x = _matrix(4, 16, 300, "outlier")
    for scheme in ("asymmetric", "symmetric"):
        kw = dict(bits=4, group_size=64, scheme=scheme, method="rtn", param_dtype=param_dtype)
        _same(engine.quantize_array(x, **kw), reference.quantize_array(x, **kw))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("param_dtype", ["float32", "float16"])
def test_mse_never_worse_than_rtn_on_any_group(family, bits, scheme, param_dtype):
    g = 64
    x = _matrix(bits * 7 + len(family), 24, 517, family)  # 517: a short last group
    kw = dict(bits=bits, group_size=g, scheme=scheme, param_dtype=param_dtype)
    rtn = engine.quantize_array(x, method="rtn", **kw)
    mse = engine.quantize_array(x, method="mse", **kw)
    e_rtn = _group_errors(x, engine.dequantize_array(rtn), g)
    e_mse = _group_errors(x, engine.dequantize_array(mse), g)
    # The search ranks candidates by float32 sums; a float64 recount may
    # differ from them by their rounding only.
    assert np.all(e_mse <= e_rtn * (1 + 1e-5) + 1e-30)
    if family != "ties":
        assert e_mse.sum() < e_rtn.sum()
    if bits == 2 and family in ("student", "outlier"):
        # where clipping matters, the gain is large
        assert e_mse.sum() < 0.8 * e_rtn.sum()


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_float16_parameters_dequantize_exactly_as_stored(method, scheme):
    x = _matrix(9, 12, 256, "gauss")
    qt = engine.quantize_array(x, bits=4, group_size=32, scheme=scheme, method=method,
                               param_dtype="float16")
    assert qt.param_dtype == "float16"
    # Stored parameters are float16 values ...
    s16 = qt.scales.astype(np.float16)
    z16 = qt.zero_points.astype(np.float16)
    np.testing.assert_array_equal(s16.astype(np.float32), qt.scales)
    np.testing.assert_array_equal(z16.astype(np.float32), qt.zero_points)
    # ... and the codes were computed from them: re-encoding with the float16
    # values read back gives the same bytes, and dequantization from them is
    # the engine's.
    rows, cols = x.shape
    G = qt.groups_per_row
    s = s16.astype(np.float32).reshape(rows, G)
    z = z16.astype(np.float32).reshape(rows, G)
    codes = reference.encode(x, 4, 32, scheme, s, z)
    np.testing.assert_array_equal(reference.pack(codes, 4), qt.data)
    np.testing.assert_array_equal(reference.dequantize_codes(codes, s, z, 32),
                                  engine.dequantize_array(qt))


def test_float16_parameters_are_counted_at_16_bits():
    x = _matrix(1, 4, 256, "gauss")
    f32 = engine.quantize_array(x, bits=4, group_size=64, param_dtype="float32", method="rtn")
    f16 = engine.quantize_array(x, bits=4, group_size=64, param_dtype="float16", method="rtn")
    assert f32.bits_per_weight == pytest.approx(4 + 64 / 64)
    assert f16.bits_per_weight == pytest.approx(4 + 32 / 64)


def test_mse_closes_most_of_the_2bit_gap():
    """At 2 bits the search gains several dB over rtn on Gaussian weights
    (the benchmark's numbers; see docs/quality.md)."""
    x = _matrix(0, 64, 1024, "gauss")

    def sqnr(method):
        qt = engine.quantize_array(x, bits=2, group_size=64, method=method,
                                   param_dtype="float16")
        return qt.metrics.sqnr_db

    assert sqnr("mse") > sqnr("rtn") + 2.0


def test_scale_underflow_is_stored_as_smallest_subnormal():
    assert round_scale_f16(np.array([1e-12, 0.0], np.float32)).tolist() == [2.0**-24, 0.0]
    x = np.array([[1e-9, -1e-9, 5e-10, 0.0]], np.float32)
    for impl in (engine, reference):
        qt = impl.quantize_array(x, bits=8, group_size=4, scheme="symmetric",
                                 param_dtype="float16", method="rtn")
        assert qt.scales[0] == np.float32(2.0**-24)


@pytest.mark.parametrize("impl", [engine, reference])
def test_float16_overflow_rules(impl):
    # rtn's zero point (about -1.5e5) overflows float16: both methods fall
    # back to the range widened to include 0, whose zero point is in [0, Q].
    x = np.zeros((2, 8), np.float32)
    x[1, 4:] = [1000.0, 1000.1, 1000.05, 1000.025]
    for method in ("rtn", "mse"):
        qt = impl.quantize_array(x, bits=4, group_size=4, method=method, param_dtype="float16")
        assert 0.0 <= qt.zero_points[3] <= 15.0
        xhat = impl.dequantize_array(qt)
        assert np.abs(xhat - x).max() <= 1000.1 / 15 / 2 + 0.1  # half a step
    # a symmetric scale beyond float16's range has no representable candidate
    big = np.array([[0.5, 0.25, 0.5, 1e7]], np.float32)
    with pytest.raises(ValidationError, match=r"row 0, group 1: rtn parameters not "
                                              r"representable in float16"):
        impl.quantize_array(big, bits=2, group_size=2, scheme="symmetric", method="rtn",
                            param_dtype="float16", name="w")
    with pytest.raises(ValidationError, match=r"row 0, group 1: no candidate parameters "
                                              r"representable in float16"):
        impl.quantize_array(big, bits=2, group_size=2, scheme="symmetric", method="mse",
                            param_dtype="float16")
    # with float32 parameters it is fine
    impl.quantize_array(big, bits=2, group_size=2, scheme="symmetric", method="mse", param_dtype="float32")


def test_method_is_recorded():
    x = _matrix(2, 2, 64, "gauss")
    assert engine.quantize_array(x, method="mse", param_dtype="float32").method == "mse"
    assert reference.quantize_array(x, method="mse", param_dtype="float32").method == "mse"


def test_end_to_end_float16_parameters_round_trip(tmp_path):
    """Through the pipeline: the V2 file holds list<float16> parameters and
    method "mse", and loading gives exactly the engine's dequantization."""
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    import arrowquant

    w = _matrix(5, 32, 256, "student")
    save_file({"layer.weight": w}, str(tmp_path / "model.safetensors"))
    arrowquant.quantize(tmp_path / "model.safetensors", tmp_path / "out", bits=4, group_size=64,
                        method="mse", param_dtype="float16")
    table = pq.read_table(tmp_path / "out" / "model.parquet")
    assert str(table.schema.field("scales").type.value_type) == "halffloat"
    assert table.column("method")[0].as_py() == "mse"
    loaded = arrowquant.load(tmp_path / "out")["layer.weight"]
    qt = engine.quantize_array(w, bits=4, group_size=64, method="mse", param_dtype="float16")
    np.testing.assert_array_equal(loaded, engine.dequantize_array(qt))
