"""GGUF export checked against the PyPI `gguf` package (gguf-py, written by the
llama.cpp project): its reader opens every file, its dequantizers agree with
the engine's, and its reference quantizers agree byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq
from arrowquant.formats.gguf import export as ge
from arrowquant.errors import ArrowQuantError, FormatError, ValidationError
from conftest import write_v1

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402


def tensors_for_export(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "tok_embd.weight": (rng.standard_normal((40, 64)) * 0.02).astype(np.float16),
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float32),
        "blk.0.ffn_up.weight": (rng.standard_normal((96, 64)) * 0.05).astype(np.float16),
        "blk.0.conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float16),
        "blk.0.odd.weight": (rng.standard_normal((10, 48)) * 0.1).astype(np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
        "blk.0.bias": rng.standard_normal(5).astype(np.float16),
        "blk.0.scale": np.array(0.75, dtype=np.float32),
        "big.weight": (rng.standard_normal((3, 4, 2, 4, 32)) * 0.1).astype(np.float32),
    }


@pytest.fixture
def model(tmp_path):
    tensors = tensors_for_export()
    return write_v1(tmp_path / "v1", tensors), tensors


def reader_tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    return r.fields[key].contents()


QTYPE = {"Q8_0": QT.Q8_0, "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1, "F16": QT.F16, "F32": QT.F32}


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"])
def test_gguf_py_reads_every_type_and_dequantizes_like_the_engine(model, tmp_path, gtype):
    src, tensors = model
    out = tmp_path / f"m-{gtype}.gguf"
    report = ge.export_gguf(src, out, gguf_type=gtype)
    r, by_name = reader_tensors(out)
    assert set(by_name) == set(tensors)
    detail = {d["name"]: d for d in report["tensors_detail"]}
    for name, a in tensors.items():
        t = by_name[name]
        expect_type = detail[name]["gguf_type"]
        assert t.tensor_type == QTYPE[expect_type], name
        theirs = gguf_dequantize(t.data, t.tensor_type)
        ours = ge.dequantize_tensor(out, name)
        np.testing.assert_array_equal(theirs.reshape(-1), ours.reshape(-1))
        x = a.astype(np.float32).reshape(-1)
        y = ours.reshape(-1)
        if expect_type in ge.BLOCK_TYPES:
            # The engine's search: per block never worse (squared error) than
            # llama.cpp's reference rounding of the same values.
            blocks = x.reshape(-1, 32)
            ref = gguf_dequantize(gguf_quantize(blocks, QTYPE[expect_type]),
                                  QTYPE[expect_type]).reshape(-1, 32)
            e_ours = ((y.reshape(-1, 32).astype(np.float64) - blocks) ** 2).sum(axis=1)
            e_ref = ((ref.astype(np.float64) - blocks) ** 2).sum(axis=1)
            assert (e_ours <= e_ref * (1 + 1e-12)).all(), name
        elif expect_type == "F16":
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(y, x)
    assert report["output_format"] == "gguf"
    assert report["file_type"] == gtype


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_bytes_equal_gguf_py_reference_quantizer(gtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.001, 10, (64, 1))).astype(np.float32)
    x[0, :32] = 0.0                      # all-zero block
    x[1, :32] = 0.25                     # constant block
    x[2, :32] = np.arange(32) - 16.0     # ties at .5 for Q8_0
    x[3, 5] = -x[3, :32].__abs__().max() * 1.5  # negative extreme
    ours = ge.quantize_bytes(x, gtype, mode="reference")
    theirs = gguf_quantize(x, QTYPE[gtype])
    assert ours.tobytes() == np.ascontiguousarray(theirs).tobytes()


def test_metadata_alignment_and_reverse_dims(model, tmp_path):
    src, tensors = model
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "tiny"}))
    out = tmp_path / "m.gguf"
    # generic: the raw export (a config.json without a llama.cpp mapping is an
    # error under the default arch="auto"; tests/test_gguf_llama.py).
    ge.export_gguf(src, out, bits=4, scheme="symmetric", arch="generic")
    r, by_name = reader_tensors(out)
    assert field(r, "general.architecture") == "arrowquant"
    assert field(r, "general.name") == "tiny"
    assert field(r, "general.alignment") == 32
    assert field(r, "general.quantization_version") == 2
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert field(r, "arrowquant.source_model_type") == "bert"
    assert r.fields["general.alignment"].types == [gguf.GGUFValueType.UINT32]
    assert r.data_offset % 32 == 0
    for t in r.tensors:
        assert t.data_offset % 32 == 0, t.name
    # GGUF dims are the reverse of the numpy shape.
    assert list(by_name["blk.0.conv.weight"].shape) == [3, 3, 8, 16]
    assert list(by_name["blk.0.ffn_up.weight"].shape) == [64, 96]
    assert list(by_name["big.weight"].shape) == [32, 4, 2, 12]  # 5-D: leading dims merged
    # The C++ reader sees the same layout as gguf-py.
    header = ge.read_header(out)
    assert header["data_offset"] == r.data_offset
    for t in header["tensors"]:
        theirs = by_name[t["name"]]
        assert t["dims"] == [int(d) for d in theirs.shape]
        assert header["data_offset"] + t["offset"] == theirs.data_offset
        assert t["nbytes"] == theirs.n_bytes


def test_llama_metadata_from_config(model, tmp_path):
    src, _ = model
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "vocab_size": 40}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "llama.gguf"
    report = ge.export_gguf(src, out, bits=8, arch="generic")
    r, _ = reader_tensors(out)
    assert report["architecture"] == "llama"
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.embedding_length") == 64
    assert field(r, "llama.block_count") == 1
    assert field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "llama.feed_forward_length") == 96
    assert field(r, "llama.context_length") == 128
    assert field(r, "llama.rope.dimension_count") == 16
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_type_choice_and_fallbacks_are_reported(model, tmp_path):
    src, tensors = model
    report = ge.export_gguf(src, tmp_path / "m.gguf", bits=4, scheme="asymmetric")
    d = {x["name"]: x for x in report["tensors_detail"]}
    assert d["blk.0.attn_q.weight"]["gguf_type"] == "Q4_1"
    assert d["blk.0.ffn_up.weight"]["gguf_type"] == "Q4_1"
    # Row length 3 (conv) and 48: no block type; lossless wider type by source dtype.
    assert d["blk.0.conv.weight"]["gguf_type"] == "F16" and d["blk.0.conv.weight"]["fallback"]
    assert d["blk.0.odd.weight"]["gguf_type"] == "F32" and d["blk.0.odd.weight"]["fallback"]
    assert "not a multiple of 32" in d["blk.0.odd.weight"]["reason"]
    assert set(report["fallbacks"]) >= {"blk.0.conv.weight", "blk.0.odd.weight"}
    # 0-D and 1-D tensors are F32.
    assert d["blk.0.attn_norm.weight"]["gguf_type"] == "F32"
    assert d["blk.0.bias"]["gguf_type"] == "F32"
    assert d["blk.0.scale"]["gguf_type"] == "F32" and d["blk.0.scale"]["gguf_dims"] == [1]
    assert "0-D" in d["blk.0.scale"]["reason"]
    assert d["blk.0.attn_q.weight"]["cosine"] > 0.98
    assert report["types"]["Q4_1"] == 4
    r, by_name = reader_tensors(tmp_path / "m.gguf")
    assert gguf_dequantize(by_name["blk.0.scale"].data, QT.F32).reshape(-1).tolist() == [0.75]
    assert ge.choose_type(8, "asymmetric") == "Q8_0"
    assert ge.choose_type(4, "symmetric") == "Q4_0"
    assert ge.choose_type(4, "asymmetric", "f16") == "F16"
    with pytest.raises(aq.ConfigurationError):
        ge.choose_type(2, "symmetric")
    with pytest.raises(aq.ConfigurationError):
        ge.choose_type(4, "symmetric", "Q8_1")


def test_streaming_many_chunks_equals_one_shot(model, tmp_path):
    src, _ = model
    one = tmp_path / "one.gguf"
    many = tmp_path / "many.gguf"
    r1 = ge.export_gguf(src, one, bits=4, scheme="symmetric")
    r2 = ge.export_gguf(src, many, bits=4, scheme="symmetric", chunk_bytes=100, threads=2)
    assert max(d["chunks"] for d in r2["tensors_detail"]) >= 40
    assert max(d["chunks"] for d in r1["tensors_detail"]) == 1
    assert one.read_bytes() == many.read_bytes()


def test_non_float_tensors_are_skipped(tmp_path):
    # A SafeTensors file with an int64 buffer (needs the SafeTensors reader).
    pytest.importorskip("arrowquant.safetensors_io")
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    st.save_file({"w": np.ones((4, 32), np.float32), "ids": np.arange(7, dtype=np.int64)}, str(path))
    report = ge.export_gguf(path, tmp_path / "m.gguf", bits=8)
    assert [s["name"] for s in report["skipped"]] == ["ids"]
    r, by_name = reader_tensors(tmp_path / "m.gguf")
    assert set(by_name) == {"w"}


def test_failures_leave_no_file(tmp_path):
    bad = {"a": np.ones((4, 64), np.float32), "b": np.ones((4, 64), np.float32)}
    bad["b"][2, 7] = np.nan
    src = write_v1(tmp_path / "v1", bad)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(ValidationError, match=r"'b'.*NaN"):
        ge.export_gguf(src, out, bits=8)
    assert list(out.parent.iterdir()) == []

    # An error raised by the source half way through.
    from arrowquant.sources import open_model

    good = write_v1(tmp_path / "v1good", {"a": np.ones((4, 64), np.float32),
                                          "b": np.ones((4, 64), np.float32)})
    source = open_model(good)
    real_read = source.read

    def failing_read(name, *args, **kwargs):
        if name == "b":
            raise OSError("disk went away")
        return real_read(name, *args, **kwargs)

    source.read = failing_read
    with pytest.raises(OSError, match="disk went away"):
        ge.export_gguf(source, out, bits=8)
    source.close()
    assert list(out.parent.iterdir()) == []

    # An existing output is refused unless overwrite is given.
    ge.export_gguf(good, out, bits=8)
    with pytest.raises(ArrowQuantError, match="already exists"):
        ge.export_gguf(good, out, bits=8)
    ge.export_gguf(good, out, bits=4, overwrite=True)
    assert gguf.GGUFReader(str(out)).tensors[0].tensor_type == QT.Q4_0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


def test_from_v2_requantizes_and_says_so(model, tmp_path):
    src, tensors = model
    v2 = tmp_path / "v2"
    aq.quantize(src, v2, bits=8, group_size=32, progress=False)
    out = tmp_path / "from-v2.gguf"
    report = ge.export_gguf(v2, out, bits=4, scheme="asymmetric")
    assert report["source_format"] == "arrowquant-parquet-v2"
    assert "requantized" in report["requantized_from"] and "int8" in report["requantized_from"]
    r, by_name = reader_tensors(out)
    assert "dequantized" in field(r, "arrowquant.requantized_from")
    q = aq.load(v2)
    x = q["blk.0.attn_q.weight"].reshape(-1, 32)
    y = gguf_dequantize(by_name["blk.0.attn_q.weight"].data, QT.Q4_1).reshape(-1, 32)
    # Per block never worse than llama.cpp's reference rounding of the same values.
    ref = gguf_dequantize(gguf_quantize(x, QT.Q4_1), QT.Q4_1).reshape(-1, 32)
    e_ours = ((y.astype(np.float64) - x) ** 2).sum(axis=1)
    assert (e_ours <= ((ref.astype(np.float64) - x) ** 2).sum(axis=1) * (1 + 1e-12)).all()


def test_inspect_and_reader_validation(model, tmp_path):
    src, tensors = model
    out = tmp_path / "m.gguf"
    ge.export_gguf(src, out, bits=8)
    info = ge.inspect_gguf(out)
    assert info["format"] == "gguf" and info["num_tensors"] == len(tensors)
    t = {x["name"]: x for x in info["tensors"]}
    assert t["blk.0.attn_q.weight"]["shape"] == [64, 64]
    assert t["blk.0.attn_q.weight"]["quant_type"] == "Q8_0"
    assert t["blk.0.attn_q.weight"]["bits_per_weight"] == pytest.approx(8.5)
    assert info["metadata"]["general.alignment"] == 32
    assert aq.api.inspect(out)["format"] == "gguf"
    data = out.read_bytes()
    bad = tmp_path / "bad.gguf"
    for cut in (3, 20, len(data) // 3, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            ge.read_header(bad)
    bad.write_bytes(b"NOTGGUF" + data[7:])
    with pytest.raises(FormatError, match="magic"):
        ge.read_header(bad)


def test_reader_accepts_files_written_by_gguf_py(tmp_path):
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_string("x.s", "hello")
    w.add_array("x.list", [1, 2, 3])
    w.add_float32("x.f", 0.5)
    w.add_bool("x.b", True)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("a", gguf_quantize(a, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("b", rng.standard_normal((3, 5)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = ge.read_header(path)
    md = {k: v for k, _, v in header["metadata"]}
    assert md["general.architecture"] == "llama"
    assert md["x.s"] == "hello" and md["x.list"] == [1, 2, 3] and md["x.b"] is True
    assert md["x.f"] == 0.5
    t = {x["name"]: x for x in header["tensors"]}
    assert t["a"]["type"] == "Q8_0" and t["a"]["dims"] == [64, 8]
    assert t["b"]["type"] == "F16" and t["b"]["dims"] == [5, 3]
    np.testing.assert_array_equal(ge.dequantize_tensor(path, "a"),
                                  gguf_dequantize(gguf_quantize(a, QT.Q8_0), QT.Q8_0))


def test_quantize_api_gguf_output(model, tmp_path):
    src, tensors = model
    out = tmp_path / "api.gguf"
    result = aq.quantize(src, out, bits=8, output_format="gguf", progress=False)
    assert result.output_format == "gguf"
    assert len(gguf.GGUFReader(str(out)).tensors) == len(tensors)


def test_progress_callback_errors_are_warnings(model, tmp_path):
    src, _ = model
    seen = []

    def cb(message, fraction):
        seen.append(fraction)
        raise RuntimeError("broken callback")

    with pytest.warns(RuntimeWarning, match="broken callback"):
        ge.export_gguf(src, tmp_path / "m.gguf", bits=8, progress=cb)
    assert seen and seen[-1] == pytest.approx(1.0)
    assert sorted(seen) == seen


def test_format_report_names_fallbacks_and_requantization(model, tmp_path):
    src, _ = model
    report = ge.export_gguf(src, tmp_path / "m.gguf", bits=4)
    text = ge.format_report(report, verbose=True)
    assert "GGUF v3" in text and "Q4_0" in text
    assert "blk.0.odd.weight" in text and "fallback" in text
    assert "compression" in text
    v2 = tmp_path / "v2"
    aq.quantize(src, v2, bits=8, group_size=32, progress=False)
    text2 = ge.format_report(ge.export_gguf(v2, tmp_path / "v2.gguf", bits=8))
    assert "requantized" in text2


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as hst  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    shapes=hst.lists(hst.lists(hst.sampled_from([1, 2, 3, 5, 32, 64, 96]), min_size=0, max_size=4),
                     min_size=1, max_size=4),
    gtype=hst.sampled_from(["Q8_0", "Q4_0", "Q4_1", "F16", "F32"]),
    dtype=hst.sampled_from(["float32", "float16"]),
    chunk=hst.sampled_from([16, 200, 1 << 20]),
    seed=hst.integers(0, 2 ** 16),
)
def test_random_models_roundtrip_through_gguf_py(tmp_path_factory, shapes, gtype, dtype, chunk, seed):
    tmp = tmp_path_factory.mktemp("hyp")
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}.weight": (rng.standard_normal(tuple(s)) * rng.uniform(0.01, 5)).astype(dtype)
               for i, s in enumerate(shapes)}
    src = write_v1(tmp / "v1", tensors)
    out = tmp / "m.gguf"
    report = ge.export_gguf(src, out, gguf_type=gtype, chunk_bytes=chunk)
    r, by_name = reader_tensors(out)
    assert set(by_name) == set(tensors)
    for d in report["tensors_detail"]:
        t = by_name[d["name"]]
        a = tensors[d["name"]]
        assert list(t.shape) == (list(reversed(a.shape)) or [1])
        theirs = gguf_dequantize(t.data, t.tensor_type).reshape(-1)
        np.testing.assert_array_equal(theirs, ge.dequantize_tensor(out, d["name"]).reshape(-1))
        if d["gguf_type"] in ("F32", "F16") and (d["gguf_type"] == "F32" or a.dtype == np.float16):
            np.testing.assert_array_equal(theirs, a.astype(np.float32).reshape(-1))
        if d["gguf_type"] in ge.BLOCK_TYPES:
            assert a.shape[-1] % 32 == 0
            assert d["cosine"] > 0.95
