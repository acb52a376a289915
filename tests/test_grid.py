"""Code grids (docs/FORMAT.md section 10): the engine (cpp/src/grid.cc) and
the numpy twin (arrowquant.reference.grid) agree bit for bit; the formulas
and the table rules hold; the search is never worse than its first
candidate; importance weights steer it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrowquant.engine import grid as eg
from arrowquant.errors import ValidationError
from arrowquant.reference import grid as rg


def _bits(a: np.ndarray) -> list:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).tolist()


@st.composite
def tensors(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 150))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 0.02, 1.0, 300.0]))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "t", "offset", "constant", "ties"]))
    if kind == "normal":
        x = rng.standard_normal((rows, cols)) * scale
    elif kind == "t":
        x = rng.standard_t(2, (rows, cols)) * scale
    elif kind == "offset":
        x = 50 + rng.standard_normal((rows, cols)) * 0.1
    elif kind == "constant":
        x = np.full((rows, cols), scale)
        x[:, ::7] = -scale
    else:  # few distinct values: ties between levels
        x = rng.integers(-4, 5, (rows, cols)) * scale / 4
    w = rng.lognormal(0, 1, cols) if draw(st.booleans()) else None
    if w is not None and draw(st.booleans()):
        w[rng.random(cols) < 0.3] = 0.0
    return x.astype(np.float32), None if w is None else w.astype(np.float32)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(t=tensors(), group_size=st.sampled_from([1, 7, 8, 16, 32, 33, 64, 128]),
       grid=st.sampled_from(["nl", "learned"]),
       param_dtype=st.sampled_from(["float16", "float32", "superblock"]))
def test_engine_and_reference_agree_bit_for_bit(t, group_size, grid, param_dtype):
    x, w = t
    try:
        ref = rg.quantize_grid(x, group_size=group_size, grid=grid, param_dtype=param_dtype,
                               importance=w)
    except ValidationError:
        with pytest.raises(ValidationError):
            eg.quantize_grid(x, group_size=group_size, grid=grid, param_dtype=param_dtype,
                             importance=w)
        return
    eng = eg.quantize_grid(x, group_size=group_size, grid=grid, param_dtype=param_dtype,
                           importance=w)
    scalar = eg.quantize_grid(x, group_size=group_size, grid=grid, param_dtype=param_dtype,
                              importance=w, force_scalar=True)
    # the AVX2 error pass (4-bit tables) and the scalar one choose the same bits
    assert _bits(scalar.levels) == _bits(eng.levels)
    assert scalar.codes.tobytes() == eng.codes.tobytes()
    assert _bits(scalar.scales) == _bits(eng.scales)
    assert _bits(scalar.zero_points) == _bits(eng.zero_points)
    assert _bits(eng.levels) == _bits(ref.levels)
    assert eng.codes.tobytes() == ref.codes.tobytes()
    assert _bits(eng.scales) == _bits(ref.scales)
    # zero points: equal values (a group whose minimum is exactly 0 may
    # carry -0 or +0; both decode identically)
    np.testing.assert_array_equal(eng.zero_points, ref.zero_points)
    assert _bits(eg.dequantize_grid(eng)) == _bits(rg.dequantize(ref))
    if param_dtype == "superblock":
        assert _bits(eng.units) == _bits(ref.units)
        assert eng.a_codes.tobytes() == ref.a_codes.tobytes()
        assert eng.c_codes.tobytes() == ref.c_codes.tobytes()
        # the per-group parameters are exactly code * unit (FORMAT.md 10.5)
        G = eng.scales.size // x.shape[0]
        K = max(1, 256 // group_size)
        sb = (np.arange(eng.scales.size) // G) * (-(-G // K)) + (np.arange(eng.scales.size) % G) // K
        d, dz = eng.units[0::2][sb], eng.units[1::2][sb]
        assert _bits(eng.scales) == _bits(eng.a_codes.astype(np.float32) * d)
        assert _bits(eng.zero_points) == _bits(eng.c_codes.astype(np.float32) * dz)
        assert eng.a_codes.min() >= 1 and eng.a_codes.max() <= 63 and eng.c_codes.max() <= 63


def test_decode_formula_and_ties():
    L = rg.NL_LEVELS
    assert L[0] == 0 and L[-1] == 15 and np.all(np.diff(L) > 0)
    assert np.all(L * 16 == np.round(L * 16))  # multiples of 1/16: exact
    s = np.float32(0.5)
    z = np.float32(3.0)
    t = rg.midpoints(L)
    # a value exactly on a midpoint goes to the lower level
    x = ((t - z) * s).astype(np.float32)
    u = (x * (np.float32(1) / s)) + z
    exact = u == t
    q = rg.codes_of(x, s, z, L)
    assert np.all(q[exact] == np.arange(15)[exact])
    assert np.array_equal(rg.decode(np.arange(16), s, z, L), ((L - z) * s).astype(np.float32))


def test_uniform_table_is_the_uniform_grid_away_from_ties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    s, z = np.float32(0.3), np.float32(7.2)
    q = rg.codes_of(x, s, z, np.arange(16, dtype=np.float32))
    u = x * (np.float32(1) / s) + z
    want = np.clip(np.rint(u), 0, 15)
    off_tie = np.abs(u - np.floor(u) - 0.5) > 1e-3
    assert np.array_equal(q[off_tie], want[off_tie])


@pytest.mark.parametrize("bad", [np.arange(15, dtype=np.float32),
                                 np.r_[0, np.arange(1, 15), 14.5].astype(np.float32),
                                 np.r_[0, 2, 1, np.arange(3, 16)].astype(np.float32),
                                 np.r_[np.arange(15), np.inf].astype(np.float32)])
def test_bad_tables_are_refused(bad):
    with pytest.raises(ValidationError):
        rg.check_levels(bad, 4)


def test_search_beats_its_first_candidate_and_uniform_levels_on_gaussian():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    gq = eg.quantize_grid(x, group_size=64, grid="nl", param_dtype="float16")
    err = float(((eg.dequantize_grid(gq) - x) ** 2).sum())
    # first candidate only: full range, float16-rounded
    xg = x.reshape(-1, 64)
    lo, hi = xg.min(1), xg.max(1)
    s = rg.round_scale_f16(((hi - lo) / np.float32(15)).astype(np.float32))
    z = rg.round_f16((-lo / s).astype(np.float32))
    q = rg.codes_of(xg, s[:, None], z[:, None], rg.NL_LEVELS)
    first = float(((rg.decode(q, s[:, None], z[:, None], rg.NL_LEVELS) - xg) ** 2).sum())
    assert err < first
    learned = eg.quantize_grid(x, group_size=64, grid="learned", param_dtype="float16")
    assert learned.levels[0] == 0 and learned.levels[-1] == 15
    from arrowquant import engine

    uni = engine.quantize_array(x, bits=4, group_size=64, method="mse", param_dtype="float16")
    err_uni = float(((engine.dequantize_array(uni) - x) ** 2).sum())
    assert err < err_uni  # the bell-shaped grid fits Gaussian weights better


def test_superblock_grid_takes_q4_0s_bytes_and_beats_the_float16_grid():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    sb = eg.quantize_grid(x, group_size=32, grid="nl", param_dtype="superblock")
    f16 = eg.quantize_grid(x, group_size=64, grid="nl", param_dtype="float16")
    assert sb.bits_per_weight() == pytest.approx(4.5 + 8 * 64 / x.size)  # + the table
    assert f16.bits_per_weight() == pytest.approx(4.5 + 8 * 64 / x.size)

    def err(gq):
        return float(((eg.dequantize_grid(gq) - x) ** 2).sum())

    assert err(sb) < err(f16)


def test_importance_weights_steer_the_search():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, (32, 128)).astype(np.float32)
    w = np.ones(128, np.float32)
    w[:16] = 100.0  # the first columns matter most
    plain = eg.quantize_grid(x, group_size=128, grid="learned")
    weighted = eg.quantize_grid(x, group_size=128, grid="learned", importance=w)

    def werr(gq):
        return float((((eg.dequantize_grid(gq) - x) ** 2) * w).sum())

    assert werr(weighted) < werr(plain)
