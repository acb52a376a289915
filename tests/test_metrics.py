"""get_markov_metrics: jumps between adjacent groups, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowquant.engine import quantize_array
from arrowquant.errors import ValidationError
from arrowquant.engine.metrics import get_markov_metrics


def test_hand_computed_relative_jumps():
    scales = np.array([[1.0, 2.0, 2.0],
                       [4.0, 1.0, 1.0]])
    zeros = np.array([[0.0, 3.0, 3.0],
                      [5.0, 5.0, 0.0]])
    m = get_markov_metrics((scales, zeros), threshold=0.4)
    # scale jumps: |2-1|/2 = 0.5, 0, |1-4|/4 = 0.75, 0
    assert m.pairs == 4
    assert m.mean_scale_jump == pytest.approx((0.5 + 0.75) / 4)
    assert m.max_scale_jump == pytest.approx(0.75)
    assert m.scale_violations == 2
    # zero-point jumps without bits: 3/3 = 1, 0, 0, 5/5 = 1
    assert m.mean_zero_point_jump == pytest.approx(0.5)
    assert m.max_zero_point_jump == 1.0
    assert m.zero_point_violations == 2
    # Pairs over the threshold: (r0, j0) scale+zp, (r1, j0) scale, (r1, j1) zp -> 3.
    assert m.violations == 3 and m.violation_rate == pytest.approx(0.75)


def test_zero_point_jumps_by_code_range_with_bits_and_separate_threshold():
    scales = np.ones((1, 4))
    zeros = np.array([[0.0, 15.0, 12.0, 12.0]])
    m = get_markov_metrics((scales, zeros), threshold=0.1, bits=4, zero_point_threshold=0.5)
    # |15 - 0| / 15 = 1.0, |12 - 15| / 15 = 0.2, 0
    assert m.max_zero_point_jump == pytest.approx(1.0)
    assert m.mean_zero_point_jump == pytest.approx(1.2 / 3)
    assert m.zero_point_violations == 1 and m.scale_violations == 0 and m.violations == 1
    assert m.as_dict()["zero_point_threshold"] == 0.5


def test_flat_parameters_and_rows_are_not_crossed():
    # Two rows of two groups: the pair (row 0 last, row 1 first) is not adjacent.
    scales = np.array([1.0, 1.0, 8.0, 8.0], dtype=np.float32)
    zeros = np.zeros(4, dtype=np.float32)
    m = get_markov_metrics((scales, zeros), groups_per_row=2)
    assert m.pairs == 2 and m.max_scale_jump == 0.0 and m.violations == 0
    assert get_markov_metrics((scales, zeros), groups_per_row=4).max_scale_jump == pytest.approx(7 / 8)


def test_zero_parameters_and_single_group():
    m = get_markov_metrics((np.zeros((2, 3)), np.zeros((2, 3))))
    assert m.max_scale_jump == 0.0 and m.violations == 0
    one = get_markov_metrics((np.ones((5, 1)), np.ones((5, 1))))
    assert one.pairs == 0 and one.mean_scale_jump == 0.0 and one.violation_rate == 0.0


def test_from_a_quantized_tensor():
    # Row of 4 groups of 4: ranges 1, 1, 3 (jump 2/3), 3.
    row = np.concatenate([np.linspace(0, 1, 4), np.linspace(0, 1, 4),
                          np.linspace(0, 3, 4), np.linspace(0, 3, 4)]).astype(np.float32)
    qt = quantize_array(row[None, :], bits=2, group_size=4, method="rtn", param_dtype="float32")
    m = get_markov_metrics(qt, threshold=0.5)
    # scales (hi-lo)/3: 1/3, 1/3, 1, 1 -> jumps 0, 2/3, 0; zero points -lo/scale = 0.
    assert m.pairs == 3
    assert m.max_scale_jump == pytest.approx(2 / 3, rel=1e-6)
    assert m.mean_scale_jump == pytest.approx(2 / 9, rel=1e-6)
    assert m.scale_violations == 1 and m.zero_point_violations == 0


def test_merge_chunks_equals_whole():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.5, 2.0, (10, 6))
    z = rng.uniform(0, 15, (10, 6))
    whole = get_markov_metrics((s, z), threshold=0.3, bits=4)
    a = get_markov_metrics((s[:4], z[:4]), threshold=0.3, bits=4)
    a.merge(get_markov_metrics((s[4:], z[4:]), threshold=0.3, bits=4))
    assert a.as_dict() == pytest.approx(whole.as_dict())
    assert a.rows == 10


def test_bad_inputs():
    with pytest.raises(ValidationError, match="differ in shape"):
        get_markov_metrics((np.ones(4), np.ones(3)), groups_per_row=2)
    with pytest.raises(ValidationError, match="need groups_per_row"):
        get_markov_metrics((np.ones(4), np.ones(4)))
    with pytest.raises(ValidationError, match="not whole rows"):
        get_markov_metrics((np.ones(5), np.ones(5)), groups_per_row=2)
    with pytest.raises(ValidationError, match="QuantizedTensor or"):
        get_markov_metrics(42)


# -- the engine's Markov pass (what the pipeline calls) == the numpy definition


def _params(rng, rows, g, zeros_too=True):
    s = (rng.random((rows, g)) * 0.1).astype(np.float32)
    s[rng.random((rows, g)) < 0.1] = 0.0          # pairs with a zero denominator
    z = rng.integers(0, 16, (rows, g)).astype(np.float32)
    return s, z


@pytest.mark.parametrize("rows,g", [(1, 1), (3, 2), (7, 9), (64, 33), (300, 41), (10, 4097)])
@pytest.mark.parametrize("bits", [4, None])
def test_markov_of_params_equals_numpy_definition(rows, g, bits):
    from arrowquant.engine.metrics import markov_of_params

    s, z = _params(np.random.default_rng(rows * g), rows, g)
    want = get_markov_metrics((s, z), groups_per_row=g, bits=bits)
    got = markov_of_params(s.reshape(-1), z.reshape(-1), g, bits)
    assert got == want  # every field, floats bit for bit (pairwise sums in numpy's order)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), g=st.integers(1, 300), seed=st.integers(0, 2**31),
       threshold=st.floats(0.0, 1.0), bits=st.sampled_from([2, 4, 8, None]))
def test_markov_of_params_property(rows, g, seed, threshold, bits):
    from arrowquant.engine.metrics import markov_of_params

    rng = np.random.default_rng(seed)
    s, z = _params(rng, rows, g)
    s *= rng.choice([-1.0, 1.0], s.shape).astype(np.float32)
    want = get_markov_metrics((s, z), threshold, groups_per_row=g, bits=bits)
    assert markov_of_params(s, z, g, bits, threshold) == want
