"""SafeTensors reading (C++ reader through arrowquant.safetensors_io) and
writing: interop with the `safetensors` package and transformers, sharded
models, hostile files, and the streaming writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save, save_file

from arrowquant import _core
from arrowquant.errors import (
    ArrowQuantIOError,
    FormatError,
    ModelNotFoundError,
    ValidationError,
)
from arrowquant.sources.safetensors import SafeTensorsModel
from arrowquant.formats.safetensors_writer import SafeTensorsWriter

ALLOWED = (FormatError, ModelNotFoundError, ValidationError)


# -- helpers -----------------------------------------------------------------


def raw_file(header, data: bytes = b"", length=None) -> bytes:
    """Length prefix + header (str, bytes or dict) + data, exactly as given."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def numpy_tensors() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "f16": rng.standard_normal((4, 2, 3)).astype(np.float16),
        "i64": rng.integers(-9, 9, (3,), dtype=np.int64),
        "i32": rng.integers(-9, 9, (2, 2), dtype=np.int32),
        "i16": rng.integers(-9, 9, (6,), dtype=np.int16),
        "i8": rng.integers(-9, 9, (1, 5), dtype=np.int8),
        "u8": rng.integers(0, 255, (3, 3), dtype=np.uint8),
        "bool": rng.integers(0, 2, (4,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "empty_cols": np.zeros((3, 0), dtype=np.float16),
    }


def assert_bytes_equal(model: SafeTensorsModel, name: str, expected: bytes) -> None:
    got = model.read_rows(name)
    assert got.dtype == np.uint8
    assert got.tobytes() == expected, name


# -- reading files made by the safetensors package ----------------------------


def test_numpy_dtypes_bit_exact(tmp_path):
    tensors = numpy_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "np", "k": "v"})
    with SafeTensorsModel(path) as m:
        assert m.files == [path]
        assert m.metadata == {"format": "np", "k": "v"}
        assert {t.name for t in m.tensors} == set(tensors)
        for t in m.tensors:
            arr = tensors[t.name]
            assert t.shape == arr.shape
            assert t.nbytes == arr.nbytes
            assert_bytes_equal(m, t.name, np.ascontiguousarray(arr).tobytes())
        dtypes = {t.name: t.dtype for t in m.tensors}
        assert dtypes["f64"] == "float64" and dtypes["bool"] == "bool" and dtypes["i8"] == "int8"
        # Header order by offset is the tensors' order.
        offsets = [off for _, _, _, off, _ in _core.SafeTensorsFile(str(path)).tensors()]
        assert offsets == sorted(offsets)


def test_torch_dtypes_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f32": base,
        "f64": base.double(),
        "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(7, dtype=torch.int64),
        "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(7, dtype=torch.int16),
        "i8": torch.arange(7, dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "conv": torch.randn(4, 3, 2, 2, generator=g).to(torch.bfloat16),
        "empty_bf16": torch.zeros(0, 8, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    torch_save(tensors, str(path))
    expected_dtype = {"bf16": "bfloat16", "f8e4m3": "float8_e4m3fn", "f8e5m2": "float8_e5m2"}
    with SafeTensorsModel(path) as m:
        for t in m.tensors:
            src = tensors[t.name].contiguous()
            raw = src.reshape(-1).view(torch.uint8).numpy().tobytes() if src.numel() else b""
            assert_bytes_equal(m, t.name, raw)
            assert t.shape == tuple(src.shape)
            if t.name in expected_dtype:
                assert t.dtype == expected_dtype[t.name]
        # Rows of the 2-D view of a 4-D conv weight: [4, 3*2*2].
        conv = tensors["conv"].reshape(4, 12).view(torch.uint8).numpy()
        np.testing.assert_array_equal(m.read_rows("conv", 1, 2), conv[1:3].reshape(-1))


def test_read_rows_ranges_and_out_reuse(tmp_path):
    w = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    save_file({"w": w, "b": np.arange(6, dtype=np.float16)}, str(tmp_path / "m.safetensors"))
    out = np.zeros(1000, dtype=np.uint8)
    with SafeTensorsModel(tmp_path) as m:
        for start in range(5):
            for count in range(0, 5 - start + 1):
                got = m.read_rows("w", start, count, out=out)
                assert count == 0 or np.shares_memory(got, out)
                assert got.tobytes() == w[start:start + count].tobytes()
        assert m.read_rows("w", 3).tobytes() == w[3:].tobytes()
        assert m.read_rows("b").view(np.float16).tolist() == list(range(6))
        assert m.read_rows("b", 0, 1).size == 12  # 1-D: one row of all elements
        out2d = np.zeros((2, 24), dtype=np.uint8)
        assert m.read_rows("w", 0, 2, out=out2d).tobytes() == w[:2].tobytes()
        with pytest.raises(ValidationError, match="out of range"):
            m.read_rows("w", 4, 2)
        with pytest.raises(ValidationError, match="out of range"):
            m.read_rows("w", -1, 1)
        with pytest.raises(ValidationError, match="needed"):
            m.read_rows("w", 0, 5, out=np.zeros(10, np.uint8))
        with pytest.raises(ValidationError, match="uint8"):
            m.read_rows("w", 0, 1, out=np.zeros(100, np.float32))
        with pytest.raises(ValidationError, match="writable"):
            ro = np.zeros(100, np.uint8)
            ro.flags.writeable = False
            m.read_rows("w", 0, 1, out=ro)
        with pytest.raises(ModelNotFoundError, match="nope"):
            m.read_rows("nope")
    with pytest.raises(ValidationError, match="closed"):
        m.read_rows("w")


def test_core_binding_surface(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.arange(4, dtype=np.int32), "b": np.ones((2, 2), np.float32)}, str(path),
              metadata={"x": "y"})
    f = _core.SafeTensorsFile(str(path))
    assert f.path == str(path)
    names = [t[0] for t in f.tensors()]
    assert set(names) == {"a", "b"}
    name, dtype, shape, offset, nbytes = f.tensors()[0]
    assert offset >= f.data_start and nbytes == 16 and dtype in ("int32", "float32")
    assert f.metadata() == {"x": "y"}
    buf = np.zeros(8, np.uint8)
    f.read_into("a", 8, buf)
    assert buf.view(np.int32).tolist() == [2, 3]
    f.read_into(names.index("b"), 0, buf)
    assert buf.view(np.float32).tolist() == [1.0, 1.0]
    with pytest.raises(ValidationError):
        f.read_into("a", 12, buf)  # past the end of the tensor
    with pytest.raises(ValidationError):
        f.read_into(5, 0, buf)
    with pytest.raises(ModelNotFoundError):
        f.read_into("zz", 0, buf)
    f.close()
    assert f.closed
    with pytest.raises(ValidationError, match="closed"):
        f.read_into("a", 0, buf)
    tensors, meta = _core.parse_safetensors_header(b'{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
                                                   2, "lbl")
    assert tensors == [("t", "uint8", [2], 0, 2)] and meta == {}
    with pytest.raises(FormatError, match="lbl"):
        _core.parse_safetensors_header(b"{", 0, "lbl")


def test_truncated_under_the_reader(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32)}, str(path))
    with SafeTensorsModel(path) as m:
        os.truncate(path, path.stat().st_size - 100)
        assert m.read_rows("a", 0, 10).size == 10 * 256  # before the cut
        with pytest.raises(FormatError, match="truncated") as e:
            m.read_rows("a", 60, 4)
        assert str(path) in str(e.value)


# -- sharded models ------------------------------------------------------------


def make_sharded(root: Path, shards: Dict[str, Dict[str, np.ndarray]], index_name: str = "model.safetensors.index.json",
                 metadata=None, weight_map=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    wm = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        for name in tensors:
            wm[name] = fname
    doc = {"metadata": metadata if metadata is not None else {"total_size": 123}, "weight_map": weight_map or wm}
    (root / index_name).write_text(json.dumps(doc))
    return root / index_name


def two_shards() -> Dict[str, Dict[str, np.ndarray]]:
    return {
        "model-00002-of-00002.safetensors": {"z.w": np.full((2, 3), 2, np.float32),
                                             "a.w": np.full((1, 3), 3, np.float32)},
        "model-00001-of-00002.safetensors": {"m.w": np.arange(6, dtype=np.float16).reshape(3, 2),
                                             "b.b": np.ones(4, np.int64)},
    }


def test_sharded_model(tmp_path):
    shards = two_shards()
    index = make_sharded(tmp_path / "m", shards)
    for target in (tmp_path / "m", index):
        with SafeTensorsModel(target) as m:
            assert m.index_path == index
            assert [p.name for p in m.files] == sorted(shards)
            # Shard order, then offset order within a shard (save_file sorts
            # by dtype size then name; the reader follows the offsets).
            names = [t.name for t in m.tensors]
            first = {t.name for t in m.tensors[:2]}
            assert first == set(shards["model-00001-of-00002.safetensors"])
            for fname, tensors in shards.items():
                f = _core.SafeTensorsFile(str(tmp_path / "m" / fname))
                by_offset = [t[0] for t in f.tensors()]
                assert [n for n in names if n in tensors] == by_offset
                for name, arr in tensors.items():
                    assert_bytes_equal(m, name, arr.tobytes())
                    assert m.file_of(name).name == fname
            assert m.metadata == {"format": "pt", "total_size": 123}


def test_diffusers_index_name_and_fd_budget(tmp_path):
    shards = {f"diffusion_pytorch_model-0000{i}-of-00004.safetensors": {f"t{i}": np.full((2, 2), i, np.float32)}
              for i in range(1, 5)}
    make_sharded(tmp_path, shards, index_name="diffusion_pytorch_model.safetensors.index.json")
    with SafeTensorsModel(tmp_path, max_open_files=1) as m:
        assert len(m.files) == 4
        for _ in range(2):  # reopens shards beyond the budget
            for i in range(1, 5):
                assert m.read_rows(f"t{i}").view(np.float32).tolist() == [float(i)] * 4
        assert len(m._handles) == 1


def test_reopened_shard_must_keep_its_header(tmp_path):
    shards = {"s1.safetensors": {"a": np.zeros(4, np.float32)}, "s2.safetensors": {"b": np.zeros(4, np.float32)}}
    make_sharded(tmp_path, shards)
    m = SafeTensorsModel(tmp_path, max_open_files=1)
    save_file({"a": np.zeros(8, np.float32)}, str(tmp_path / "s1.safetensors"))
    with pytest.raises(FormatError, match="changed"):
        m.read_rows("a")
    m.close()


def test_index_missing_shards_named(tmp_path):
    index = make_sharded(tmp_path, two_shards())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors") as e:
        SafeTensorsModel(tmp_path)
    assert str(index) in str(e.value)


def test_index_tensor_not_in_shard_and_unlisted(tmp_path):
    shards = two_shards()
    wm = {n: f for f, ts in shards.items() for n in ts}
    wm["ghost"] = "model-00001-of-00002.safetensors"
    make_sharded(tmp_path / "a", shards, weight_map=wm)
    with pytest.raises(FormatError, match="'ghost'.*does not hold it"):
        SafeTensorsModel(tmp_path / "a")
    wm = {n: f for f, ts in shards.items() for n in ts}
    del wm["z.w"]
    make_sharded(tmp_path / "b", shards, weight_map=wm)
    with pytest.raises(FormatError, match="'z.w'.*does not list"):
        SafeTensorsModel(tmp_path / "b")
    wm = {n: f for f, ts in shards.items() for n in ts}
    wm["z.w"] = "model-00001-of-00002.safetensors"  # listed in the wrong shard
    make_sharded(tmp_path / "c", shards, weight_map=wm)
    with pytest.raises(FormatError):
        SafeTensorsModel(tmp_path / "c")


@pytest.mark.parametrize("shard_name", [
    "../outside.safetensors",
    "sub/../../outside.safetensors",
    "/etc/passwd",
    "a\\..\\..\\outside.safetensors",
])
def test_index_path_traversal_rejected(tmp_path, shard_name):
    outside = tmp_path / "outside.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard_name}}))
    with pytest.raises(ValidationError, match="model directory|backslash") as e:
        SafeTensorsModel(model)
    assert "model.safetensors.index.json" in str(e.value)


def test_index_symlink_escape_rejected(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    (model / "shard.safetensors").symlink_to(outside)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
    with pytest.raises(ValidationError, match="outside the model directory"):
        SafeTensorsModel(model)


def test_hf_cache_snapshot_symlinks_allowed(tmp_path):
    # models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"x": np.arange(3, dtype=np.float32)}, str(repo / "blobs" / "h1"))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/h1")
    (repo / "blobs" / "h2").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/h2")
    with SafeTensorsModel(snap) as m:
        assert m.read_rows("x").view(np.float32).tolist() == [0, 1, 2]


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {}}', "no tensors"),
    ('{"weight_map": {"a": 5}}', "file name"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "more than once"),
    ('{"weight_map": {"a": "x.safetensors"}, "metadata": 3}', "metadata"),
    ('{"weight_map": ' + "[" * 100000 + "]" * 100000 + "}", "nested|weight_map"),
])
def test_index_malformed(tmp_path, text, match):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(FormatError, match=match) as e:
        SafeTensorsModel(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


def test_directory_resolution(tmp_path):
    with pytest.raises(ModelNotFoundError):
        SafeTensorsModel(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        SafeTensorsModel(tmp_path)
    save_file({"a": np.zeros(1, np.float32)}, str(tmp_path / "x.safetensors"))
    with SafeTensorsModel(tmp_path) as m:
        assert m.files[0].name == "x.safetensors"
    save_file({"a": np.zeros(1, np.float32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValidationError, match="several"):
        SafeTensorsModel(tmp_path)
    save_file({"b": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    with SafeTensorsModel(tmp_path) as m:
        assert m.files[0].name == "model.safetensors"


def test_transformers_sharded_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = model.state_dict()
    with SafeTensorsModel(tmp_path) as m:
        assert len(m.files) > 1
        assert {t.name for t in m.tensors} == set(state)
        for t in m.tensors:
            src = state[t.name].contiguous()
            assert t.dtype == "bfloat16" and t.shape == tuple(src.shape)
            assert_bytes_equal(m, t.name, src.reshape(-1).view(torch.uint8).numpy().tobytes())
        assert "total_size" in m.metadata


# -- hostile files -----------------------------------------------------------------

OK_HEADER = {"t": entry("U8", [2], 0, 2)}

ATTACKS: List[Tuple[str, bytes, str]] = [
    ("len_2_63", raw_file(OK_HEADER, b"xy", length=1 << 63), "larger than the rest of the file"),
    ("len_max", raw_file(OK_HEADER, b"xy", length=(1 << 64) - 1), "larger than the rest of the file"),
    ("header_past_file", raw_file(OK_HEADER, b"xy", length=len(json.dumps(OK_HEADER)) + 50),
     "larger than the rest of the file"),
    ("too_short", b"\x05\x00", "too short"),
    ("offsets_past_end", raw_file({"t": entry("U8", [4], 0, 4)}, b"xy"), "past the end"),
    ("overlap", raw_file({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, b"x" * 6), "overlaps"),
    ("gap_out_of_order", raw_file({"b": entry("U8", [2], 4, 6), "a": entry("U8", [2], 0, 2)}, b"x" * 6), "gap"),
    ("begin_after_end", raw_file({"a": entry("U8", [2], 4, 2)}, b"x" * 4), "end before they begin"),
    ("trailing_bytes", raw_file(OK_HEADER, b"xyz"), "trailing bytes"),
    ("numel_overflow", raw_file({"a": entry("F32", [1 << 32, 1 << 32], 0, 0)}), "overflows int64"),
    ("bytes_overflow", raw_file({"a": entry("F64", [1 << 61], 0, 0)}), "byte size"),
    ("negative_dim", raw_file({"a": entry("U8", [-1], 0, 0)}), "negative"),
    ("huge_dim", raw_file('{"a":{"dtype":"U8","shape":[99999999999999999999999],"data_offsets":[0,0]}}'),
     "too large"),
    ("dim_2_63", raw_file({"a": entry("U8", [1 << 63], 0, 0)}), "does not fit in int64"),
    ("float_dim", raw_file('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"xy"), "integer"),
    ("unknown_dtype", raw_file({"a": entry("F12", [1], 0, 1)}, b"x"), "unsupported dtype 'F12'"),
    ("u16_dtype", raw_file({"a": entry("U16", [1], 0, 2)}, b"xy"), "unsupported dtype 'U16'"),
    ("byte_mismatch", raw_file({"a": entry("F32", [2], 0, 4)}, b"xxxx"), "need 8"),
    ("duplicate_names", raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                 '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy"), "more than once"),
    ("deep_nesting", raw_file('{"a":{"x":' + "[" * 100000 + "]" * 100000 + "}}"), "nested deeper"),
    ("enormous_json_field", raw_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"pad":' +
                                     "[" + ",".join(["0"] * 200000) + "]}}", b"x" * 2), "trailing bytes"),
    ("non_utf8_name", raw_file(b'{"\xff\xfe":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"), "UTF-8"),
    ("overlong_utf8_name", raw_file(b'{"\xc0\xaf":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"), "UTF-8"),
    ("lone_surrogate", raw_file('{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"), "surrogate"),
    ("nul_in_name", raw_file('{"a\\u0000":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"), "NUL"),
    ("metadata_not_str", raw_file('{"__metadata__":{"k":1}}'), "not a string"),
    ("not_an_object", raw_file("[]"), "JSON object"),
    ("truncated_json", raw_file(json.dumps(OK_HEADER)[:-3], b"xy"), "end of JSON"),
    ("trailing_garbage", raw_file(json.dumps(OK_HEADER) + " ]", b"xy"), "trailing characters"),
    ("missing_offsets", raw_file('{"a":{"dtype":"U8","shape":[1]}}', b"x"), "missing \"data_offsets\""),
]


@pytest.mark.parametrize("name,data,match", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_hand_made_attacks(tmp_path, name, data, match):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match) as e:
        SafeTensorsModel(path)
    assert str(path) in str(e.value)
    with pytest.raises(FormatError, match=match):
        _core.parse_safetensors_buffer(data, "mem.safetensors")


def test_enormous_header_length_claim_is_not_allocated(tmp_path):
    # A 150 MB "header" in a sparse file: refused by the 100 MB limit before
    # anything is read or allocated.
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(8 + 150_000_000 + 10)
    with pytest.raises(FormatError, match="limit") as e:
        SafeTensorsModel(path)
    assert str(path) in str(e.value)


def _valid_files() -> List[bytes]:
    rng = np.random.default_rng(3)
    return [
        save({"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.ones(3, np.float16)},
             metadata={"format": "pt"}),
        save({"a": np.arange(5, dtype=np.int64), "s": np.array(True), "e": np.zeros((0, 2), np.int8)}),
        save({}),
    ]


VALID = _valid_files()


def _check_open_and_read(path: Path) -> None:
    try:
        m = SafeTensorsModel(path)
    except ALLOWED as e:
        assert str(path) in str(e), str(e)
        return
    with m:
        for t in m.tensors:
            assert m.read_rows(t.name).size == t.nbytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, len(VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
                   max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_files_fail_cleanly(tmp_path, which, edits, cut):
    data = bytearray(VALID[which])
    for pos, value, op in edits:
        if not data:
            break
        pos %= len(data)
        if op == "set":
            data[pos] = value
        elif op == "insert":
            data.insert(pos, value)
        else:
            del data[pos]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    _check_open_and_read(path)
    try:
        _core.parse_safetensors_buffer(bytes(data), "mem")
    except FormatError as e:
        assert "mem" in str(e)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
tensor_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "U8", "BOOL", "I64", "F8_E4M3", "X"]),
     "shape": st.lists(st.integers(-2, 2**40), max_size=4),
     "data_offsets": st.lists(st.integers(-1, 64), min_size=0, max_size=3)},
    optional={"extra": json_values},
)
headers = st.dictionaries(st.text(max_size=6), st.one_of(tensor_entries, json_values), max_size=5)


@settings(max_examples=300, deadline=None)
@given(header=headers, data_size=st.integers(0, 2**64 - 1))
def test_random_headers_never_crash(header, data_size):
    text = json.dumps(header).encode("utf-8", "surrogatepass")
    try:
        tensors, _ = _core.parse_safetensors_header(text, data_size, "h.safetensors")
    except FormatError as e:
        assert "h.safetensors" in str(e)
        return
    # Accepted: the tensors tile the data section exactly.
    end = 0
    for _name, _dtype, _shape, off, nbytes in tensors:
        assert off == end
        end += nbytes
    assert end == data_size


# -- writer --------------------------------------------------------------------


def test_writer_round_trip_with_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    tensors = {
        "w": torch.randn(7, 9, generator=g).to(torch.bfloat16),
        "h": torch.randn(3, 5, generator=g).half(),
        "f": torch.randn(2, 2, 2, generator=g),
        "empty": torch.zeros(0, 3),
        "s": torch.tensor(2, dtype=torch.int64),
        "m": torch.tensor([True, False]),
    }
    path = tmp_path / "out.safetensors"
    specs = [(n, str(t.dtype).replace("torch.", ""), list(t.shape)) for n, t in tensors.items()]
    with SafeTensorsWriter(path, specs, metadata={"format": "pt"}) as w:
        for name, t in tensors.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
            for i in range(0, len(raw), 5):  # odd-sized pieces
                w.write(name, raw[i:i + 5])
    assert list(tmp_path.iterdir()) == [path]
    back = load_file(str(path))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with SafeTensorsModel(path) as m:
        assert m.metadata == {"format": "pt"}
        assert _core.SafeTensorsFile(str(path)).data_start % 8 == 0


def test_writer_numpy_and_codes(tmp_path):
    from safetensors.numpy import load_file

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "o.safetensors"
    w = SafeTensorsWriter(path, [("a", "F32", a.shape), ("t", "int8", [0]), ("b", "uint8", [2])])
    w.write("a", a[:1])
    w.write("a", b"")  # zero-byte pieces are fine anywhere
    w.write("a", a[1:].T.copy().T)  # non-contiguous source arrays are copied in C order
    w.write("t", np.zeros(0, np.int8))  # an empty tensor may be written explicitly
    w.write("b", b"\x07\x08")
    w.write("b", b"")
    w.close()
    back = load_file(str(path))
    np.testing.assert_array_equal(back["a"], a)
    assert back["b"].tolist() == [7, 8] and back["t"].shape == (0,)


@pytest.mark.parametrize("scenario", ["out_of_order", "unknown", "too_many_bytes", "incomplete",
                                      "exception_in_with", "io_error"])
def test_writer_cleans_up_on_error(tmp_path, scenario):
    path = tmp_path / "o.safetensors"
    path.write_bytes(b"previous")  # an existing file is kept untouched by a failed write
    specs = [("a", "float32", [2]), ("b", "float16", [2])]
    if scenario == "exception_in_with":
        with pytest.raises(RuntimeError):
            with SafeTensorsWriter(path, specs) as w:
                w.write("a", np.zeros(2, np.float32))
                raise RuntimeError("boom")
    else:
        w = SafeTensorsWriter(path, specs)
        assert w.temp_path is not None and w.temp_path.exists()
        if scenario == "out_of_order":
            with pytest.raises(ValidationError, match="in order"):
                w.write("b", b"\x00" * 4)
        elif scenario == "unknown":
            with pytest.raises(ValidationError, match="unknown tensor"):
                w.write("zz", b"\x00")
        elif scenario == "too_many_bytes":
            with pytest.raises(ValidationError, match="holds 8 bytes"):
                w.write("a", b"\x00" * 9)
        elif scenario == "incomplete":
            w.write("a", b"\x00" * 8)
            w.write("b", b"\x00" * 2)
            with pytest.raises(ValidationError, match="got 2 of 4"):
                w.close()
        elif scenario == "io_error":
            class Failing:
                def __init__(self, f):
                    self.f = f

                def write(self, _data):
                    raise OSError(28, "No space left on device")

                def close(self):
                    self.f.close()

            w._file = Failing(w._file)
            with pytest.raises(ArrowQuantIOError, match="No space left"):
                w.write("a", b"\x00" * 8)
        with pytest.raises(ValidationError, match="closed"):
            w.write("a", b"\x00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]
    assert path.read_bytes() == b"previous"


def test_writer_rejects_bad_specs(tmp_path):
    path = tmp_path / "o.safetensors"
    for specs, match in [
        ([("a", "float32", [2]), ("a", "float32", [2])], "more than once"),
        ([("a", "complex64", [2])], "unsupported dtype"),
        ([("a", "float32", [-1])], "bad dimension"),
        ([("__metadata__", "float32", [1])], "invalid tensor name"),
        ([("a", "float32", [2**40, 2**40])], "too large"),
        ([("\ud800", "float32", [1])], "Unicode"),
    ]:
        with pytest.raises(ValidationError, match=match):
            SafeTensorsWriter(path, specs)
    with pytest.raises(ValidationError, match="str to str"):
        SafeTensorsWriter(path, [("a", "float32", [1])], metadata={"k": 1})
    assert list(tmp_path.iterdir()) == []


_NUMPY_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
                 "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
tensor_names = st.text(min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__" and "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.dictionaries(tensor_names,
                          st.tuples(st.sampled_from(sorted(_NUMPY_DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
                          max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_writer_reader_safetensors_agree(tmp_path, specs, seed):
    """Random models written by SafeTensorsWriter read back identically by
    SafeTensorsModel and by the safetensors package."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (dtype, shape) in specs.items():
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize, dtype=np.uint8)
        arr = raw.view(_NUMPY_DTYPES[dtype]).reshape(shape)
        arrays[name] = (arr != 0) if dtype == "bool" else arr
    path = tmp_path / "h.safetensors"
    with SafeTensorsWriter(path, [(n, d, s) for n, (d, s) in specs.items()]) as w:
        for name, arr in arrays.items():
            w.write(name, arr)
    back = load_file(str(path))
    assert set(back) == set(arrays)
    with SafeTensorsModel(path) as m:
        for name, arr in arrays.items():
            assert back[name].tobytes() == arr.tobytes()
            assert m.read_rows(name).tobytes() == arr.tobytes()
            assert m.info(name).shape == arr.shape


@pytest.fixture(scope="module")
def index_playground(tmp_path_factory):
    base = tmp_path_factory.mktemp("playground")
    save_file({"secret": np.zeros(2, np.float32)}, str(base / "outside.safetensors"))
    model = base / "model"
    (model / "sub").mkdir(parents=True)
    save_file({"x": np.arange(4, dtype=np.float32), "y": np.ones((2, 2), np.float16)}, str(model / "a.safetensors"))
    save_file({"z": np.arange(3, dtype=np.int64)}, str(model / "b.safetensors"))
    save_file({"w": np.zeros(1, np.uint8)}, str(model / "sub" / "c.safetensors"))
    (model / "loop.safetensors").symlink_to("loop.safetensors")
    (model / "esc.safetensors").symlink_to("../outside.safetensors")
    (model / "not_st.safetensors").write_bytes(b"\x00" * 40)
    return model


shard_names = st.one_of(
    st.sampled_from(["a.safetensors", "b.safetensors", "sub/c.safetensors", "./a.safetensors",
                     "sub/../a.safetensors", "../outside.safetensors", "/etc/passwd", "loop.safetensors",
                     "esc.safetensors", "not_st.safetensors", "missing.safetensors", "sub", "", "a" * 5000,
                     "a.safetensors\x00", "model.safetensors.index.json"]),
    st.text(max_size=20),
    st.integers(),
    st.none(),
)


@settings(max_examples=200, deadline=None)
@given(
    weight_map=st.dictionaries(st.sampled_from(["x", "y", "z", "w", "secret"]) | st.text(max_size=5),
                               shard_names, max_size=5),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4),
                                                  max_size=3), st.integers()),
)
def test_random_indexes_fail_cleanly(index_playground, weight_map, metadata):
    model = index_playground
    doc = {"weight_map": weight_map}
    if metadata is not None:
        doc["metadata"] = metadata
    (model / "model.safetensors.index.json").write_text(json.dumps(doc))
    try:
        m = SafeTensorsModel(model)
    except ALLOWED as e:
        assert str(model) in str(e), str(e)
        return
    with m:
        for f in m.files:  # never a file outside the model directory
            assert model.resolve() in f.resolve().parents
        for t in m.tensors:
            assert t.name != "secret"
            assert m.read_rows(t.name).size == t.nbytes


def test_index_choice_and_drop_cache(tmp_path):
    shards = {"a.safetensors": {"x": np.arange(4, dtype=np.float32)}}
    make_sharded(tmp_path, shards, index_name="diffusion_pytorch_model.fp16.safetensors.index.json")
    make_sharded(tmp_path, shards, index_name="other.safetensors.index.json")
    with pytest.raises(ValidationError, match="several SafeTensors indexes"):
        SafeTensorsModel(tmp_path)
    with SafeTensorsModel(tmp_path / "other.safetensors.index.json", drop_cache=True) as m:
        assert m.read_rows("x").view(np.float32).tolist() == [0, 1, 2, 3]
    make_sharded(tmp_path, shards, index_name="diffusion_pytorch_model.safetensors.index.json")
    with SafeTensorsModel(tmp_path) as m:
        assert m.index_path.name == "diffusion_pytorch_model.safetensors.index.json"
