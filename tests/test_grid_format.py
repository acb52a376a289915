"""Code grids in V2 files (FORMAT.md section 10.3): --method grid-nl /
grid-learned written by the pipeline, read back bit for bit as the engine and
its numpy twin decode them, refused by an older reader, hostile code_levels
rows refused, the CLI round trip and --resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import arrowquant as aq
from arrowquant import engine, reference
from arrowquant.cli import main
from arrowquant.errors import FormatError, ValidationError
from arrowquant.formats import v2_checks, v2_reader


def _model(root: Path) -> dict:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    t = {"a.weight": rng.standard_normal((48, 256)).astype(np.float32),
         "b.weight": (rng.standard_normal((40, 96)) * 0.05).astype(np.float16),
         "c.bias": rng.standard_normal(40).astype(np.float32)}
    root.mkdir(parents=True, exist_ok=True)
    save_file(t, str(root / "model.safetensors"))
    return t


@pytest.mark.parametrize("method", ["grid-nl", "grid-learned"])
@pytest.mark.parametrize("pd", ["superblock", "float16"])
def test_file_decodes_as_the_engine_and_the_twin(tmp_path, method, pd):
    t = _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method=method, param_dtype=pd,
                chunk_size="4KiB", progress=False)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["format_version"] == 3
    pf = pq.ParquetFile(str(tmp_path / "out" / "model.parquet"))
    assert pf.schema_arrow.metadata[b"arrowquant.format_version"] == b"3"
    m = aq.load(tmp_path / "out")
    for name in ("a.weight", "b.weight"):
        e = m.info(name)
        assert e.quant_type == "grid4" and e.param_dtype == pd
        if name == "a.weight":
            assert len(e.chunks) > 1  # one table over several chunks
        qt = engine.quantize_array(t[name], bits=4, method=method, param_dtype=pd)
        twin = reference.quantize_array(t[name], bits=4, method=method, param_dtype=pd)
        got = m[name]
        for want in (engine.dequantize_array(qt), reference.dequantize_array(twin)):
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        raw = m.raw(name)
        assert np.array_equal(raw.data, qt.data) and np.array_equal(raw.code_levels,
                                                                     qt.code_levels)
    assert m.info("c.bias").quant_type == "none"


def test_uniform_files_keep_their_version(tmp_path):
    _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method="mse", progress=False)
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["format_version"] == 2
    names = pq.ParquetFile(str(tmp_path / "out" / "model.parquet")).schema_arrow.names
    assert "code_levels" not in names


def test_an_older_reader_refuses_a_grid_file(tmp_path, monkeypatch):
    _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method="grid-nl", progress=False)
    monkeypatch.setattr(v2_checks, "READABLE_VERSIONS", (1, 2))
    with pytest.raises(FormatError, match="reads versions 1, 2"):
        aq.load(tmp_path / "out")
    # A reader that ignores the version still meets a quant_type it does not know.
    monkeypatch.setattr(v2_checks, "READABLE_VERSIONS", (1, 2, 3))
    monkeypatch.setattr(v2_reader, "QUANT_TYPES", {"int2": 2, "int4": 4, "int8": 8, "none": None})
    with pytest.raises(FormatError, match="quant_type 'grid4' is not one of"):
        aq.load(tmp_path / "out")


def _rewrite(path: Path, fn) -> None:
    """Rewrites every row of a V2 file through fn(row dict) -> row dict."""
    pf = pq.ParquetFile(str(path))
    sch = pf.schema_arrow
    rows = [fn(dict(r)) for r in pf.read().to_pylist()]
    table = pa.Table.from_pylist(rows, schema=sch)
    pq.write_table(table, str(path), row_group_size=1)


def _first_grid(change):
    done = []

    def fn(r):
        if r["quant_type"] == "grid4" and not done:
            done.append(1)
            change(r)
        return r
    return fn


HOSTILE = [
    (lambda r: r.update(code_levels=None), FormatError, "null code_levels"),
    (lambda r: r.update(code_levels=r["code_levels"][:8]), FormatError, "holds 8 levels"),
    (lambda r: r.update(code_levels=[0.0] + [float("nan")] * 14 + [15.0]), ValidationError,
     "finite"),
    (lambda r: r.update(code_levels=list(reversed(r["code_levels"]))), ValidationError,
     "strictly increasing"),
    (lambda r: r.update(code_levels=[v + 1 for v in r["code_levels"]]), ValidationError,
     "from 0 to 15"),
    (lambda r: r.update(quant_type="int4"), FormatError, "code_levels set on a 'int4' row"),
]


@pytest.mark.parametrize("change,err,msg", HOSTILE)
def test_hostile_code_levels_are_refused(tmp_path, change, err, msg):
    _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method="grid-learned", progress=False)
    _rewrite(tmp_path / "out" / "model.parquet", _first_grid(change))
    with pytest.raises(err, match=msg) as info:
        aq.load(tmp_path / "out")
    assert "model.parquet" in str(info.value) and "tensor" in str(info.value)


def test_chunks_with_different_tables_are_refused(tmp_path):
    _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method="grid-learned", chunk_size="4KiB",
                progress=False)
    seen = []

    def fn(r):
        if r["layer_name"] == "a.weight":
            seen.append(1)
            if len(seen) == 2:
                L = list(r["code_levels"])
                L[7] = float(np.float32((L[6] + L[7]) / 2))
                r["code_levels"] = L
        return r
    _rewrite(tmp_path / "out" / "model.parquet", fn)
    with pytest.raises(FormatError, match="code_levels differ"):
        aq.load(tmp_path / "out")


def test_cli_round_trip(tmp_path, capsys):
    t = _model(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "src"), str(out), "--method", "grid-learned"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "grid4" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "src"), str(out)]) == 0
    assert main(["dequantize", str(out), str(tmp_path / "deq.safetensors")]) == 0
    from safetensors.numpy import load_file

    deq = load_file(str(tmp_path / "deq.safetensors"))
    want = engine.dequantize_array(engine.quantize_array(t["a.weight"], method="grid-learned"))
    got = deq["a.weight"]
    assert np.array_equal(got, want.astype(got.dtype))


def test_spec_refuses_what_a_grid_cannot_be():
    with pytest.raises(ValidationError, match="asymmetric"):
        engine.quantize_array(np.ones((2, 64), np.float32), method="grid-nl", scheme="symmetric",
                              param_dtype="float16")
    with pytest.raises(ValidationError, match="4-bit table"):
        engine.quantize_array(np.ones((2, 64), np.float32), bits=8, method="grid-nl")


def test_resume_after_an_interruption_writes_identical_bytes(tmp_path):
    _model(tmp_path / "src")
    kw = dict(method="grid-learned", chunk_size="4KiB", shard_size="16KiB")
    aq.quantize(tmp_path / "src", tmp_path / "full", progress=False, **kw)
    cancel = threading.Event()
    seen: List[float] = []

    def progress(msg: str, frac: float) -> None:
        seen.append(frac)
        if len(seen) == 4:
            cancel.set()

    part = tmp_path / "part"
    with pytest.raises(aq.CancelledError):
        aq.quantize(tmp_path / "src", part, progress=progress, cancel=cancel, **kw)
    staged = sorted((part / ".arrowquant-staging").glob("*.part"))
    assert staged
    aq.quantize(tmp_path / "src", part, resume=True, progress=False, **kw)
    full = sorted(p.name for p in (tmp_path / "full").glob("*.parquet"))
    assert full == sorted(p.name for p in part.glob("*.parquet"))
    for name in full:
        assert (tmp_path / "full" / name).read_bytes() == (part / name).read_bytes()


def test_torch_loaders_dequantize_grid_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from arrowquant.runtime.layers import QuantLinear

    t = _model(tmp_path / "src")
    aq.quantize(tmp_path / "src", tmp_path / "out", method="grid-nl", progress=False)
    m = aq.load(tmp_path / "out")
    with pytest.raises(FormatError, match="code grid"):
        QuantLinear.from_quantized(m.raw("a.weight"))
    from arrowquant.torch import replace_linear

    model = torch.nn.Sequential()
    model.a = torch.nn.Linear(256, 48, bias=False)
    replace_linear(model, tmp_path / "out", load_other_tensors=False)
    want = engine.dequantize_array(engine.quantize_array(t["a.weight"], method="grid-nl"))
    assert isinstance(model.a, torch.nn.Linear)
    assert np.array_equal(model.a.weight.detach().numpy().view(np.uint32), want.view(np.uint32))


def test_grid_from_config_file_and_environment(tmp_path):
    from arrowquant.config import resolve

    (tmp_path / "c.yaml").write_text("method: grid-learned\n")
    assert resolve(config_file=tmp_path / "c.yaml", environ={}).spec_for(4).grid == "learned"
    cfg = resolve(environ={"ARROW_QUANT_METHOD": "grid-nl"})
    assert cfg.spec_for(4).quant_type == "grid4" and cfg.spec_for(4).superblock
    assert cfg.spec_for(8).method == "grid-learned"  # the fixed table is 4-bit
    with pytest.raises(Exception, match="asymmetric|grid"):
        resolve(environ={"ARROW_QUANT_METHOD": "grid-nl"},
                overrides={"scheme": "symmetric", "param_dtype": "float16"})


def test_gguf_output_refuses_a_grid(tmp_path):
    _model(tmp_path / "src")
    with pytest.raises(aq.ConfigurationError, match="code grid"):
        aq.quantize(tmp_path / "src", tmp_path / "o.gguf", output_format="gguf",
                    method="grid-nl", progress=False)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.sampled_from([32, 96, 200, 256, 300]),
       group=st.sampled_from([16, 32, 64]), method=st.sampled_from(["grid-nl", "grid-learned"]),
       pd=st.sampled_from(["superblock", "float16", "float32"]),
       chunk=st.sampled_from(["1KiB", "4KiB", "64MiB"]), seed=st.integers(0, 3))
def test_property_file_equals_engine(tmp_path_factory, rows, cols, group, method, pd, chunk,
                                     seed):
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("p")
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) *
         np.random.default_rng(seed + 9).lognormal(0, 1, cols)).astype(np.float32)
    save_file({"w": x}, str(d / "m.safetensors"))
    aq.quantize(d / "m.safetensors", d / "out", method=method, param_dtype=pd, group_size=group,
                chunk_size=chunk, progress=False)
    got = aq.load(d / "out")["w"]
    qt = engine.quantize_array(x, method=method, param_dtype=pd, group_size=group)
    twin = reference.quantize_array(x, method=method, param_dtype=pd, group_size=group)
    assert np.array_equal(got.view(np.uint32), engine.dequantize_array(qt).view(np.uint32))
    assert np.array_equal(got.view(np.uint32), reference.dequantize_array(twin).view(np.uint32))
