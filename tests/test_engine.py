"""The in-memory engine (arrowquant.engine) against FORMAT.md and the numpy
reference: known answers computed by hand, every input dtype, validation
errors, error bounds and quality on Gaussian weights, zero-copy input."""

from __future__ import annotations

import tracemalloc
from typing import Callable, Dict

import numpy as np
import pytest

from arrowquant import engine, reference
from arrowquant.errors import ArrowQuantError, ValidationError
from arrowquant.engine.tensor import QuantizedTensor, as_source

ml_dtypes = pytest.importorskip("ml_dtypes")

F32 = np.float32


#: The FORMAT.md contract these tests check: rtn parameters in float32.
RTN_F32 = {"method": "rtn", "param_dtype": "float32"}


def _engine_simd(a, **kw) -> QuantizedTensor:
    return engine.quantize_array(a, force_scalar=False, **{**RTN_F32, **kw})


def _engine_scalar(a, **kw) -> QuantizedTensor:
    kw.setdefault("threads", 1)
    return engine.quantize_array(a, force_scalar=True, **{**RTN_F32, **kw})


def _reference(a, **kw) -> QuantizedTensor:
    return reference.quantize_array(a, **{**RTN_F32, **kw})


IMPLS: Dict[str, Callable[..., QuantizedTensor]] = {
    "engine": _engine_simd,
    "engine-scalar": _engine_scalar,
    "reference": _reference,
}
DEQUANT = {
    "engine": engine.dequantize_array,
    "engine-scalar": lambda qt: engine.dequantize_array(qt, force_scalar=True),
    "reference": reference.dequantize_array,
}


def u32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same(a: QuantizedTensor, b: QuantizedTensor) -> None:
    """Bit-for-bit equality of two results (metrics within a tolerance)."""
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(u32(a.scales), u32(b.scales))
    np.testing.assert_array_equal(u32(a.zero_points), u32(b.zero_points))
    ma, mb = a.metrics, b.metrics
    assert ma.cosine == pytest.approx(mb.cosine, rel=1e-6, abs=1e-9)
    assert ma.rel_mse == pytest.approx(mb.rel_mse, rel=1e-5, abs=1e-30)
    assert ma.max_abs_error == pytest.approx(mb.max_abs_error, rel=1e-5, abs=1e-38)
    assert a.error.count == b.error.count


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_avx2_path_selected_when_the_cpu_has_it():
    flags = cpu_flags()
    if {"avx2", "f16c", "fma"} <= flags:
        assert engine.active_kernel() == "avx2"
    else:
        assert engine.active_kernel() == "scalar"


# --- known answers, computed by hand from FORMAT.md ---------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_int2_asymmetric(impl):
    # lo -1, hi 2: scale 3/3 = 1, zero -(-1)/1 = 1. x*1 + 1 = 0, 1, 1.5, 3;
    # rint: 0, 1, 2 (half to even), 3 -> byte 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4.
    x = np.array([-1.0, 0.0, 0.5, 2.0], dtype=F32)
    qt = IMPLS[impl](x, bits=2, group_size=4)
    assert qt.data.tolist() == [0xE4]
    assert qt.scales.tolist() == [1.0] and qt.zero_points.tolist() == [1.0]
    assert DEQUANT[impl](qt).tolist() == [-1.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_int4_float32_inverse(impl):
    # lo 0, hi 2: scale = 2/15 = 0.13333334 (float32); inv = 1/scale =
    # 7.4999995 (float32), not 7.5; zero = -(+0)/scale = -0.0.
    # x*inv + zero: 0 -> 0; 2 -> 14.999999 -> 15; 1 -> 7.4999995 -> 7
    # (an exact 7.5 would round to 8); 0.5 -> 3.7499998 -> 4.
    # Codes 0, 15, 7, 4 -> bytes 0 | 15<<4 = 0xF0, 7 | 4<<4 = 0x47.
    x = np.array([0.0, 2.0, 1.0, 0.5], dtype=F32)
    qt = IMPLS[impl](x, bits=4, group_size=4)
    scale = F32(2.0) / F32(15.0)
    assert F32(1.0) / scale == F32(7.4999995)
    assert u32(qt.scales).tolist() == [scale.view(np.uint32)]
    assert u32(qt.zero_points).tolist() == [0x80000000]  # -0.0
    assert qt.data.tolist() == [0xF0, 0x47]
    expected = np.array([0, 15, 7, 4], dtype=F32) * scale  # (q - (-0)) * scale
    np.testing.assert_array_equal(u32(DEQUANT[impl](qt)), u32(expected))


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_int4_symmetric(impl):
    # a = 7, M = 7: scale 1, zero 8. rint(x) + 8: -3.5 -> -4 + 8 = 4 (half to
    # even), 7 -> 15, 0.25 -> 8, -7 -> 1. Bytes 4 | 15<<4 = 0xF4, 8 | 1<<4 = 0x18.
    x = np.array([-3.5, 7.0, 0.25, -7.0], dtype=F32)
    qt = IMPLS[impl](x, bits=4, group_size=4, scheme="symmetric")
    assert qt.scales.tolist() == [1.0] and qt.zero_points.tolist() == [8.0]
    assert qt.data.tolist() == [0xF4, 0x18]
    assert DEQUANT[impl](qt).tolist() == [-4.0, 7.0, 0.0, -7.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_rows_short_groups_and_padding(impl):
    # 2 rows x 5 columns, INT2, group 2: groups [2, 2, 1] per row.
    # Row 0: [0, 3] scale 1, zero -0.0 -> codes 0, 3; [1, 1] constant: scale 1,
    # zero -1 -> codes rint(1 - 1) = 0, 0; [-2] constant: scale 1, zero 2 ->
    # code 0. Codes 0 3 0 0 | 0 -> byte0 = 0 | 3<<2 = 0x0C, byte1 = 0.
    # Row 1: [6, 0] lo 0 hi 6 scale 2 zero -0.0 -> codes 3, 0; [4, 2] lo 2
    # hi 4 scale 2/3 = 0.6666667 (0.666666687 in float32), inv 1/0.666666687 =
    # 1.49999996 rounds to 1.5 in float32, zero -2/0.666666687 = -2.99999991
    # rounds to -3.0: 4*1.5 - 3 = 3 -> 3; 2*1.5 - 3 = 0 -> 0; [5] constant:
    # zero -5 -> 0. Codes 3 0 3 0 | 0 -> byte0 = 3 | 0 | 3<<4 | 0 = 0x33.
    x = np.array([[0.0, 3.0, 1.0, 1.0, -2.0], [6.0, 0.0, 4.0, 2.0, 5.0]], dtype=F32)
    qt = IMPLS[impl](x, bits=2, group_size=2)
    assert qt.data.tolist() == [0x0C, 0x00, 0x33, 0x00]
    two_thirds = F32(2.0) / F32(3.0)
    assert qt.scales.tolist() == [1.0, 1.0, 1.0, 2.0, float(two_thirds), 1.0]
    assert qt.zero_points.tolist() == [0.0, -1.0, 2.0, 0.0, -3.0, -5.0]
    assert F32(1.0) / two_thirds == F32(1.5)
    xhat = DEQUANT[impl](qt)
    assert xhat[0].tolist() == [0.0, 3.0, 1.0, 1.0, -2.0]
    assert xhat[1, :2].tolist() == [6.0, 0.0] and xhat[1, 4] == 5.0


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_int8_and_zero_dimensional(impl):
    # A 0-D tensor is one group of one element: constant, scale 1, zero -x.
    qt = IMPLS[impl](np.array(2.5, dtype=F32), bits=8, group_size=128)
    assert qt.shape == () and qt.data.tolist() == [0]
    assert qt.scales.tolist() == [1.0] and qt.zero_points.tolist() == [-2.5]
    assert float(DEQUANT[impl](qt)) == 2.5
    # INT8 over 0..255: scale 255/255 = 1, zero -0.0, codes are the values.
    x = np.arange(256, dtype=F32)[::-1].copy()
    qt = IMPLS[impl](x, bits=8, group_size=256)
    assert qt.data.tolist() == list(range(255, -1, -1))


# --- every input dtype ----------------------------------------------------------


def _gaussian(shape, seed=0, scale=0.05) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_dtypes_match_reference(dtype, bits, scheme):
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
                "float8_e5m2": ml_dtypes.float8_e5m2}[dtype]
    a = (_gaussian((19, 300), seed=bits) * 40).astype(np_dtype)
    for g in (7, 64, 128, 1000):
        ref = reference.quantize_array(a, bits=bits, group_size=g, scheme=scheme, method="rtn", param_dtype="float32")
        assert ref.dtype == dtype
        for force_scalar in (False, True):
            for threads in (1, 2):
                got = engine.quantize_array(a, bits=bits, group_size=g, scheme=scheme,
                                            force_scalar=force_scalar, threads=threads, method="rtn", param_dtype="float32")
                assert_same(got, ref)
        # Raw bytes with the dtype named give the same result.
        raw = a.view(np.uint8 if a.itemsize == 1 else (np.uint16 if a.itemsize == 2 else F32))
        got = engine.quantize_array(raw, dtype=dtype, bits=bits, group_size=g, scheme=scheme, method="rtn", param_dtype="float32")
        assert_same(got, ref)
        np.testing.assert_array_equal(
            u32(engine.dequantize_array(got)), u32(reference.dequantize_array(ref))
        )


def test_float16_subnormals_and_signed_zeros():
    h = np.array([0x0001, 0x8001, 0x03FF, 0x8000, 0x0000, 0x83FF, 0x0200, 0x0400],
                 dtype=np.uint16).view(np.float16)
    a = np.tile(h, (3, 5))
    for bits in (2, 4, 8):
        for g in (1, 3, 8, 40):
            ref = reference.quantize_array(a, bits=bits, group_size=g, method="rtn", param_dtype="float32")
            assert_same(engine.quantize_array(a, bits=bits, group_size=g, method="rtn", param_dtype="float32"), ref)
            assert_same(engine.quantize_array(a, bits=bits, group_size=g, force_scalar=True, method="rtn", param_dtype="float32"),
                        ref)


# --- edge values ------------------------------------------------------------------


EDGE_CASES = {
    "constant groups": np.full((4, 64), 0.375, dtype=F32),
    "all zeros": np.zeros((3, 33), dtype=F32),
    "negative zeros": np.full((3, 33), -0.0, dtype=F32),
    "mixed signed zeros": np.where(np.arange(99).reshape(3, 33) % 2, F32(-0.0), F32(0.0)),
    "single element": np.array([[-3.0]], dtype=F32),
    "row shorter than a group": _gaussian((5, 7)),
    "huge": _gaussian((4, 50)) * F32(1e30),
    "huge constant offset": np.full((2, 40), 1e30, dtype=F32) + _gaussian((2, 40)),
    "tiny": _gaussian((4, 50)) * F32(1e-30),
    "subnormals": ((np.arange(100, dtype=np.uint32) * 3)
                   | ((np.arange(100, dtype=np.uint32) % 2) << 31)).view(F32).reshape(2, 50),
    "near float32 max, same sign": np.linspace(1e38, 3e38, 64, dtype=F32).reshape(2, 32),
    "all-equal rows": np.repeat(np.arange(5, dtype=F32)[:, None], 70, axis=1),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_edge_values_match_reference(case, scheme):
    a = np.ascontiguousarray(EDGE_CASES[case])
    for bits in (2, 4, 8):
        for g in (1, 4, 32, 128):
            ref = reference.quantize_array(a, bits=bits, group_size=g, scheme=scheme, method="rtn", param_dtype="float32")
            for force_scalar in (False, True):
                got = engine.quantize_array(a, bits=bits, group_size=g, scheme=scheme,
                                            force_scalar=force_scalar, method="rtn", param_dtype="float32")
                assert_same(got, ref)
                np.testing.assert_array_equal(
                    u32(engine.dequantize_array(got)), u32(reference.dequantize_array(ref))
                )


def test_constant_group_reconstructs_exactly():
    a = np.full((2, 16), -7.25, dtype=F32)
    for impl in IMPLS.values():
        qt = impl(a, bits=4, group_size=8)
        assert qt.scales.tolist() == [1.0] * 4
        assert qt.zero_points.tolist() == [7.25] * 4
        assert not qt.data.any()
        assert qt.metrics.max_abs_error == 0.0 and qt.metrics.cosine == 1.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", [2, 8, 64])
def test_range_overflow_is_a_validation_error(impl, g):
    a = np.ones((2, 64), dtype=F32)
    a[1, 4] = 3e38
    a[1, 5] = -3e38
    with pytest.raises(ValidationError, match="overflows float32"):
        IMPLS[impl](a, bits=4, group_size=g, name="big")
    # Symmetric uses max |x| only: no overflow.
    IMPLS[impl](a, bits=4, group_size=g, scheme="symmetric")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad,kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_rejected_with_name_and_first_index(impl, bad, kind):
    a = _gaussian((6, 40))
    a[3, 17] = bad
    a[5, 2] = np.nan  # a later bad value does not win
    with pytest.raises(ValidationError) as info:
        IMPLS[impl](a, bits=4, group_size=16, name="blocks.3.attn.q")
    msg = str(info.value)
    assert "blocks.3.attn.q" in msg
    assert f"{kind} at index {3 * 40 + 17}" in msg
    assert "row 3, column 17" in msg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_reported_before_an_overflow_in_an_earlier_row(impl, threads):
    a = np.ones((64, 32), dtype=F32)
    a[0, 0], a[0, 1] = 3e38, -3e38  # row 0: max - min overflows
    a[50, 7] = np.nan
    with pytest.raises(ValidationError, match=f"NaN at index {50 * 32 + 7} "):
        IMPLS[impl](a, bits=4, group_size=8, threads=threads)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_float16_and_bfloat16(impl):
    h = _gaussian((2, 10)).astype(np.float16)
    h[1, 9] = np.inf
    with pytest.raises(ValidationError, match="Inf at index 19"):
        IMPLS[impl](h, name="h")
    b = _gaussian((2, 10)).astype(ml_dtypes.bfloat16)
    b[0, 4] = np.nan
    with pytest.raises(ValidationError, match="NaN at index 4"):
        IMPLS[impl](b, name="b")


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_validation_errors(impl):
    q = IMPLS[impl]
    a = _gaussian((8, 16))
    with pytest.raises(ValidationError, match="not C-contiguous"):
        q(a[:, ::2])
    with pytest.raises(ValidationError, match="not C-contiguous"):
        q(a.T)
    with pytest.raises(ValidationError, match="int32 cannot be quantized"):
        q(np.ones((4, 4), dtype=np.int32))
    with pytest.raises(ValidationError, match="float64 cannot be quantized"):
        q(np.ones((4, 4), dtype=np.float64))
    with pytest.raises(ValidationError, match="empty"):
        q(np.zeros((0, 16), dtype=F32))
    with pytest.raises(ValidationError, match="group size"):
        q(a, group_size=0)
    with pytest.raises(ValidationError, match="group size"):
        q(a, group_size=-4)
    with pytest.raises(ValidationError, match="bits must be 2, 4 or 8"):
        q(a, bits=3)
    with pytest.raises(ValidationError, match="scheme"):
        q(a, scheme="affine")
    with pytest.raises(ValidationError, match="needs"):
        q(np.zeros(10, dtype=np.uint16), dtype="bfloat16", shape=(3, 4))
    with pytest.raises(ValidationError, match="needs dtype"):
        q(b"\x00" * 16)
    with pytest.raises(ValidationError, match="cannot be quantized"):
        q(np.zeros(8, dtype=np.uint8), dtype="int8")
    with pytest.raises(ArrowQuantError):
        q("not an array")


def test_engine_checks_buffer_sizes_itself():
    from arrowquant import _core

    src = np.zeros(12, dtype=np.uint8)
    packed = np.empty(2, dtype=np.uint8)
    scales = np.empty(1, dtype=F32)
    zeros = np.empty(1, dtype=F32)
    with pytest.raises(ValidationError, match="needs"):
        _core.quantize(src, "float32", 1, 4, 4, 128, "asymmetric", "rtn", "float32", packed,
                       scales, zeros)
    src = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValidationError, match="packed buffer has 2 elements"):
        _core.quantize(src, "float32", 1, 4, 8, 128, "asymmetric", "rtn", "float32", packed,
                       scales, zeros)


# --- accuracy -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("g", [32, 128, 100])
def test_asymmetric_error_bound(bits, g):
    a = _gaussian((64, 500), seed=bits + g)
    qt = engine.quantize_array(a, bits=bits, group_size=g, method="rtn", param_dtype="float32")
    xhat = engine.dequantize_array(qt)
    G = qt.groups_per_row
    scale = np.repeat(qt.scales.reshape(64, G), g, axis=1)[:, :500]
    slack = 4 * np.spacing(np.abs(a)) + 4 * np.spacing(scale)
    assert np.all(np.abs(a - xhat) <= scale / 2 + slack)
    # The metric agrees with the values.
    assert qt.metrics.max_abs_error == pytest.approx(float(np.max(np.abs(a - xhat))), rel=1e-6)


def test_cosine_on_gaussian_weights():
    a = _gaussian((256, 1024), seed=3, scale=0.02)
    int4 = engine.quantize_array(a, bits=4, group_size=128, method="rtn", param_dtype="float32")
    int8 = engine.quantize_array(a, bits=8, group_size=128, method="rtn", param_dtype="float32")
    assert int4.metrics.cosine > 0.99
    assert int8.metrics.cosine > 0.9999
    # The metric is the cosine of the dequantized tensor.
    xhat = engine.dequantize_array(int4).astype(np.float64)
    x = a.astype(np.float64)
    direct = float(np.dot(x.ravel(), xhat.ravel()) / np.linalg.norm(x) / np.linalg.norm(xhat))
    assert int4.metrics.cosine == pytest.approx(direct, abs=1e-9)


def test_one_very_long_row():
    # 1-D: one row of 1.5M elements (the engine's per-row scratch outgrows
    # its kept buffer), groups of 4096 and one group larger than the row.
    a = _gaussian((1_500_001,), seed=12).astype(np.float16)
    for g in (4096, 2_000_000):
        ref = reference.quantize_array(a, bits=4, group_size=g, method="rtn", param_dtype="float32")
        assert_same(engine.quantize_array(a, bits=4, group_size=g, method="rtn", param_dtype="float32"), ref)


def test_threads_and_paths_give_identical_bytes():
    a = _gaussian((301, 517), seed=9).astype(np.float16)
    one = engine.quantize_array(a, bits=4, group_size=64, threads=1, method="rtn", param_dtype="float32")
    for threads in (2, 3, 0):
        for force_scalar in (False, True):
            other = engine.quantize_array(a, bits=4, group_size=64, threads=threads,
                                          force_scalar=force_scalar, method="rtn", param_dtype="float32")
            assert_same(one, other)


def test_error_sums_do_not_depend_on_thread_timing():
    a = _gaussian((400, 300), seed=1)
    first = engine.quantize_array(a, bits=4, group_size=32, threads=4, method="rtn", param_dtype="float32").error.as_tuple()
    for _ in range(4):
        assert engine.quantize_array(a, bits=4, group_size=32, threads=4, method="rtn", param_dtype="float32").error.as_tuple() == first


# --- zero copy ------------------------------------------------------------------


def test_buffers_are_read_in_place():
    a = _gaussian((64, 256), seed=4)
    assert np.shares_memory(as_source(a).raw, a)
    mv = memoryview(a)
    assert np.shares_memory(as_source(mv, dtype="float32", shape=a.shape).raw, a)
    ref = engine.quantize_array(a, bits=4, group_size=64, method="rtn", param_dtype="float32")
    from_bytes = engine.quantize_array(a.tobytes(), dtype="float32", shape=a.shape, bits=4,
                                       group_size=64, method="rtn", param_dtype="float32")
    from_view = engine.quantize_array(mv, dtype="float32", shape=a.shape, bits=4, group_size=64, method="rtn", param_dtype="float32")
    assert_same(from_bytes, ref)
    assert_same(from_view, ref)
    # A read-only buffer (as pyarrow hands out) is accepted too.
    ro = a.copy()
    ro.setflags(write=False)
    assert_same(engine.quantize_array(ro, bits=4, group_size=64, method="rtn", param_dtype="float32"), ref)


def test_quantize_allocates_only_its_outputs():
    a = _gaussian((1024, 2048), seed=5)  # 8 MiB
    engine.quantize_array(a[:2], bits=4, group_size=128, method="rtn", param_dtype="float32")  # warm-up
    tracemalloc.start()
    try:
        qt = engine.quantize_array(a, bits=4, group_size=128, method="rtn", param_dtype="float32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = qt.data.nbytes + qt.scales.nbytes + qt.zero_points.nbytes
    assert peak < outputs + a.nbytes // 4, (peak, outputs)
