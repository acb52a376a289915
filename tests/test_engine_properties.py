"""Hypothesis properties: the C++ engine (SIMD and scalar paths, 1 or 2
threads) and the numpy reference agree bit for bit on packed bytes, scales,
zero points and dequantized values, across random shapes (0-D, 1-D, 2-D,
4-D conv), group sizes, bit widths, schemes and input dtypes; both reject the
same inputs with the same kind of error.

The examples are derandomized (the same ones on every run) and kept few
enough for CI; set ARROWQUANT_HYPOTHESIS_EXAMPLES to explore more."""

from __future__ import annotations

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from arrowquant import engine, reference  # noqa: E402
from arrowquant.errors import ValidationError  # noqa: E402

EXAMPLES = int(os.environ.get("ARROWQUANT_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}

shapes = st.one_of(
    st.just(()),
    hnp.array_shapes(min_dims=1, max_dims=1, min_side=1, max_side=300),
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
    # conv [out, in, kh, kw]
    st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3)),
)
group_sizes = st.one_of(st.sampled_from([1, 2, 3, 8, 16, 32, 33, 64, 100, 128, 256]),
                        st.integers(1, 400))
# The FORMAT.md rtn contract (rtn parameters in float32).
specs = st.fixed_dictionaries({
    "bits": st.sampled_from([2, 4, 8]),
    "group_size": group_sizes,
    "scheme": st.sampled_from(["asymmetric", "symmetric"]),
    "method": st.just("rtn"),
    "param_dtype": st.just("float32"),
})


def _not_finite(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Mask of raw bit patterns that are NaN or Inf in `dtype`."""
    r = raw.astype(np.uint32)
    if dtype == "float32":
        return (r & 0x7F800000) == 0x7F800000
    if dtype == "float16":
        return (r & 0x7C00) == 0x7C00
    if dtype == "bfloat16":
        return (r & 0x7F80) == 0x7F80
    if dtype == "float8_e4m3fn":
        return (r & 0x7F) == 0x7F
    return (r & 0x7C) == 0x7C  # float8_e5m2


@st.composite
def tensors(draw, allow_non_finite: bool = False):
    """(array of the dtype, dtype name). Values are either weight-like
    (Gaussian with a random scale and offset, rounded to the dtype, with
    signed zeros and repeats sprinkled in) or arbitrary finite bit patterns
    (subnormals, huge magnitudes, every exponent)."""
    dtype = draw(st.sampled_from(list(DTYPES)))
    np_dtype = DTYPES[dtype]
    shape = draw(shapes)
    n = int(np.prod(shape, dtype=np.int64))
    kind = draw(st.sampled_from(["weights", "weights", "bits", "few values"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "bits":
        raw = rng.integers(0, 2 ** (8 * np_dtype.itemsize), size=n, dtype=np.uint64)
        raw = raw.astype(RAW[np_dtype.itemsize])
        if not allow_non_finite:
            # Clear one exponent bit of NaN/Inf patterns: finite, still extreme.
            low_exp_bit = {"float32": 1 << 23, "float16": 1 << 10, "bfloat16": 1 << 7,
                           "float8_e4m3fn": 1 << 3, "float8_e5m2": 1 << 2}[dtype]
            bad = _not_finite(raw, dtype)
            raw[bad] = raw[bad] ^ RAW[np_dtype.itemsize](low_exp_bit)
        a = raw.view(np_dtype)
    else:
        scale = draw(st.sampled_from([1e-6, 1e-3, 0.02, 1.0, 30.0, 400.0]))
        offset = draw(st.sampled_from([0.0, 0.0, 1.0, -5.0]))
        values = rng.standard_normal(n) * scale + offset * scale
        if kind == "few values":
            values = rng.choice(np.array([0.0, -0.0, 1.5, -2.25, scale]), size=n)
        values[rng.random(n) < 0.05] = 0.0
        values[rng.random(n) < 0.05] = -0.0
        a = values.astype(np.float32).astype(np_dtype)
        if dtype != "float32" and not allow_non_finite:
            a[~np.isfinite(a.astype(np.float32))] = 0  # overflowed the dtype's range
    if allow_non_finite and n:
        a = a.copy()
        bad_at = rng.integers(0, n, size=draw(st.integers(1, 3)))
        bad_value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if dtype == "float8_e4m3fn" and np.isinf(bad_value):
            bad_value = np.nan  # e4m3fn has no infinities
        a[bad_at] = bad_value
    return a.reshape(shape), dtype


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except ValidationError as exc:
        return None, exc


def _u32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _check_same(got, ref) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_array_equal(_u32(got.scales), _u32(ref.scales))
    np.testing.assert_array_equal(_u32(got.zero_points), _u32(ref.zero_points))
    mg, mr = got.metrics, ref.metrics
    assert got.error.count == ref.error.count
    if np.isfinite(mr.rel_mse) and np.isfinite(mg.rel_mse):
        assert mg.rel_mse == pytest.approx(mr.rel_mse, rel=1e-4, abs=1e-30)
        assert mg.cosine == pytest.approx(mr.cosine, rel=1e-6, abs=1e-6)
    assert mg.max_abs_error == pytest.approx(mr.max_abs_error, rel=1e-5, abs=1e-38)


@SETTINGS
@given(data=tensors(), spec=specs, force_scalar=st.booleans(), threads=st.sampled_from([1, 2]),
       raw_input=st.booleans())
def test_engine_matches_reference_bit_for_bit(data, spec, force_scalar, threads, raw_input):
    a, dtype = data
    ref, ref_err = _run(reference.quantize_array, a, **spec)
    if raw_input:  # raw uint bytes with the dtype named
        src = a.view(RAW[a.dtype.itemsize]) if a.ndim else a.reshape(1).view(RAW[a.dtype.itemsize])
        got, got_err = _run(engine.quantize_array, src, dtype=dtype, shape=a.shape,
                            force_scalar=force_scalar, threads=threads, **spec)
    else:
        got, got_err = _run(engine.quantize_array, a, force_scalar=force_scalar,
                            threads=threads, **spec)
    # The only finite input either may refuse: a group whose max - min overflows.
    assert (ref_err is None) == (got_err is None), (ref_err, got_err)
    if ref_err is not None:
        assert "overflows float32" in str(ref_err) and "overflows float32" in str(got_err)
        assert spec["scheme"] == "asymmetric"
        return
    _check_same(got, ref)
    xhat_ref = reference.dequantize_array(ref)
    xhat = engine.dequantize_array(got, threads=threads, force_scalar=force_scalar)
    assert xhat.shape == a.shape
    np.testing.assert_array_equal(_u32(xhat), _u32(xhat_ref))
    # The engine decodes the reference's output identically too.
    np.testing.assert_array_equal(_u32(engine.dequantize_array(ref)), _u32(xhat_ref))


@SETTINGS
@given(data=tensors(), spec=specs)
def test_asymmetric_reconstruction_within_half_a_step(data, spec):
    a, _ = data
    if spec["scheme"] != "asymmetric":
        return
    qt, err = _run(engine.quantize_array, a, **spec)
    if err is not None:
        return
    x = a.astype(np.float32).reshape(qt.rows, qt.cols)
    xhat = engine.dequantize_array(qt).reshape(qt.rows, qt.cols)
    g = spec["group_size"]
    scale = np.repeat(qt.scales.reshape(qt.rows, -1), g, axis=1)[:, : qt.cols]
    zero = np.repeat(qt.zero_points.reshape(qt.rows, -1), g, axis=1)[:, : qt.cols]
    # Slack: a few ulps of the values involved in x*inv + z and (q - z) * s.
    slack = 4 * (np.spacing(np.abs(x)) + np.spacing(np.abs(zero) + 2.0**spec["bits"]) * scale)
    with np.errstate(over="ignore", invalid="ignore"):
        err_abs = np.abs(x.astype(np.float64) - xhat.astype(np.float64))
    assert np.all(err_abs <= scale.astype(np.float64) / 2 + slack)


@SETTINGS
@given(data=tensors(allow_non_finite=True), spec=specs, force_scalar=st.booleans())
def test_non_finite_rejected_identically(data, spec, force_scalar):
    a, _ = data
    with pytest.raises(ValidationError) as ref_info:
        reference.quantize_array(a, name="w.bad", **spec)
    with pytest.raises(ValidationError) as got_info:
        engine.quantize_array(a, name="w.bad", force_scalar=force_scalar, threads=2, **spec)
    flat = a.astype(np.float32).reshape(-1)
    first = int(np.argmax(~np.isfinite(flat)))
    for info in (ref_info, got_info):
        msg = str(info.value)
        assert "'w.bad'" in msg
        assert f"at index {first} " in msg
        assert ("NaN" if np.isnan(flat[first]) else "Inf") in msg
