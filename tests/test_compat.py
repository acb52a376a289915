"""The first version's API (arrow_quant_v2) on top of the new engine."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import arrowquant as aq
import arrow_quant_v2 as v2
from arrowquant import engine
from conftest import write_v1

st = pytest.importorskip("safetensors.numpy")


def llm_tensors(seed: int = 0, layers: int = 2):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": (rng.standard_normal((64, 64)) * 0.02).astype(np.float16)}
    for i in range(layers):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = (rng.standard_normal((64, 64)) * 0.05).astype(np.float32)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = (rng.standard_normal((96, 64)) * 0.05).astype(np.float16)
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(64, np.float32)
    return t


def write_sharded(d: Path, tensors, shards: int = 2) -> Path:
    """A Hugging Face style sharded SafeTensors model: shards + index."""
    d.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        st.save_file(part, str(d / fname))
        for n, a in part.items():
            weight_map[n] = fname
            total += a.nbytes
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


@pytest.fixture
def sharded(tmp_path):
    tensors = llm_tensors()
    return write_sharded(tmp_path / "model", tensors), tensors


def test_names_are_reexported():
    for name in ("ArrowQuantV2", "AsyncArrowQuantV2", "DiffusionQuantConfig",
                 "ShardedSafeTensorsLoader", "quantize_diffusion_model",
                 "load_sharded_safetensors"):
        assert hasattr(v2, name), name
    assert v2.QuantizationError is aq.QuantizationError
    assert v2.ConfigurationError is aq.ConfigurationError
    assert v2.ValidationError is aq.ValidationError
    assert v2.ModelNotFoundError is aq.ModelNotFoundError
    assert v2.MetadataError is aq.MetadataError
    assert v2.ShapeMismatchError is aq.ShapeMismatchError
    from arrowquant.config import DiffusionQuantConfig

    assert v2.DiffusionQuantConfig is DiffusionQuantConfig


def test_quantize_diffusion_model_result_and_progress(sharded, tmp_path):
    src, tensors = sharded
    out = tmp_path / "q"
    events = []
    result = v2.ArrowQuantV2(mode="diffusion").quantize_diffusion_model(
        src, out, progress_callback=lambda m, f: events.append((m, f)))
    assert set(result) >= {"quantized_path", "compression_ratio", "cosine_similarity",
                           "model_size_mb", "modality", "bit_width", "quantization_time_s"}
    assert result["quantized_path"] == str(out)
    assert result["bit_width"] == 4
    assert result["compression_ratio"] > 3
    assert 0.95 < result["cosine_similarity"] <= 1.0
    assert result["model_size_mb"] == pytest.approx(
        sum(p.stat().st_size for p in out.glob("*.parquet")) / 2 ** 20)
    assert result["quantization_time_s"] > 0
    assert set(aq.load(out)) == set(tensors)
    assert events and all(isinstance(m, str) and 0.0 <= f <= 1.0 for m, f in events)
    assert events[-1][1] == 1.0
    assert [f for _, f in events] == sorted(f for _, f in events)


def test_config_object_dict_and_errors(sharded, tmp_path):
    src, _ = sharded
    cfg = v2.DiffusionQuantConfig(bit_width=8, group_size=32)
    r = v2.ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "q8", config=cfg)
    assert r["bit_width"] == 8
    entry = aq.load(tmp_path / "q8").info("model.layers.0.self_attn.q_proj.weight")
    assert entry.quant_type == "int8" and entry.group_size == 32
    r2 = v2.quantize_diffusion_model(src, tmp_path / "q2", config={"bit_width": 2, "group_size": 64})
    assert r2["bit_width"] == 2
    assert aq.load(tmp_path / "q2").info("model.layers.1.mlp.up_proj.weight").quant_type == "int2"
    base = v2.ArrowQuantV2(mode="base").quantize_diffusion_model(src, tmp_path / "qb")
    assert base["bit_width"] == 4
    with pytest.raises(v2.ConfigurationError):
        v2.ArrowQuantV2(mode="turbo")
    with pytest.raises(v2.ConfigurationError):
        v2.ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "bad", config={"bit_width": 3})
    with pytest.raises(v2.ModelNotFoundError):
        v2.ArrowQuantV2().quantize_diffusion_model(tmp_path / "nope", tmp_path / "x")
    # Below min_accuracy with fail_fast: a QuantizationError naming the model.
    strict = v2.DiffusionQuantConfig(bit_width=2, group_size=64, min_accuracy=0.999, fail_fast=True,
                                     fallback_thresholds={2: 0.0, 4: 0.0, 8: 0.0})
    with pytest.raises(v2.QuantizationError, match="min_accuracy"):
        v2.ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "strict", config=strict)


def test_callback_exceptions_are_warnings(sharded, tmp_path):
    src, _ = sharded

    def broken(message, fraction):
        raise ValueError("callback bug")

    with pytest.warns(RuntimeWarning, match="callback bug"):
        r = v2.ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "q", progress_callback=broken)
    assert Path(r["quantized_path"], "metadata.json").exists()


def test_quantize_from_safetensors_and_validate_quality(sharded, tmp_path):
    src, tensors = sharded
    single = tmp_path / "single.safetensors"
    st.save_file({k: v for k, v in tensors.items()}, str(single))
    q = v2.ArrowQuantV2()
    r = q.quantize_from_safetensors(single, tmp_path / "q")
    assert r["bit_width"] == 4
    report = q.validate_quality(single, tmp_path / "q")
    assert set(report["per_layer_accuracy"]) == set(tensors)
    assert report["passed"] is True and not report["failed_layers"]
    assert report["cosine_similarity"] > 0.95
    assert report["compression_ratio"] == pytest.approx(r["compression_ratio"])
    assert q.validate_quality(single, tmp_path / "q", min_accuracy=0.99999)["passed"] is False
    v1 = write_v1(tmp_path / "v1", {"w": np.ones((4, 32), np.float32)})
    with pytest.raises(v2.ValidationError, match="SafeTensors"):
        q.quantize_from_safetensors(v1 / "model.parquet", tmp_path / "q-v1")


def test_quantize_batch_matches_engine_and_handles_errors():
    rng = np.random.default_rng(0)
    weights = {"a": rng.standard_normal((16, 64)).astype(np.float32),
               "b": rng.standard_normal((8, 40)).astype(np.float16),
               "c": rng.standard_normal((4, 32)).tolist()}
    q = v2.ArrowQuantV2()
    out = q.quantize_batch(weights, bit_width=8)
    for name in ("a", "b"):
        expect = engine.quantize_array(weights[name], bits=8)  # INT8's defaults (spec.default_spec)
        assert out[name]["quantized_data"].tobytes() == expect.data.tobytes()
        assert out[name]["scales"].tobytes() == expect.scales.tobytes()
        assert out[name]["bit_width"] == 8 and out[name]["shape"] == list(weights[name].shape)
        np.testing.assert_array_equal(aq.dequantize_array(out[name]["quantized"]),
                                      engine.dequantize_array(expect))
    assert out["c"]["shape"] == [4, 32] and out["c"]["cosine_similarity"] > 0.99
    assert q.quantize_batch({"a": weights["a"]})["a"]["bit_width"] == 4  # mode default

    bad = dict(weights, nan=np.full((2, 32), np.nan, np.float32))
    with pytest.raises(v2.QuantizationError, match="'nan'"):
        q.quantize_batch(bad)
    with pytest.warns(RuntimeWarning, match="nan"):
        partial = q.quantize_batch(bad, continue_on_error=True)
    assert partial["nan"]["error_type"] == "ValidationError" and "NaN" in partial["nan"]["error"]
    assert "quantized_data" in partial["a"]
    with pytest.raises(v2.ConfigurationError):
        q.quantize_batch(weights, bit_width=3)


def arrow_input(n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {f"layer{i}": rng.standard_normal((4 + i, 32 * (i + 1))).astype(np.float32)
              for i in range(n)}
    table = pa.table({
        "layer_name": list(arrays),
        "weights": pa.array([a.reshape(-1) for a in arrays.values()], pa.list_(pa.float32())),
        "shape": pa.array([list(a.shape) for a in arrays.values()], pa.list_(pa.int64())),
    })
    return arrays, table


def test_quantize_arrow_every_batch_of_a_table():
    arrays, table = arrow_input()
    multi = pa.Table.from_batches(table.to_batches(max_chunksize=2))
    assert multi.column("weights").num_chunks == 3
    q = v2.ArrowQuantV2()
    result = q.quantize_arrow(multi, bit_width=4)
    assert isinstance(result, pa.Table)
    assert result.column("layer_name").to_pylist() == list(arrays)
    expect = q.quantize_batch(arrays, bit_width=4)
    for i, name in enumerate(arrays):
        assert result.column("quantized_data")[i].as_py() == expect[name]["quantized_data"].tobytes()
        np.testing.assert_array_equal(
            np.asarray(result.column("scales")[i].as_py(), np.float32), expect[name]["scales"])
        assert result.column("shape")[i].as_py() == list(arrays[name].shape)
    # A record batch, and a sliced one (offsets relative to the parent buffers).
    batch = table.to_batches()[0].slice(2, 2)
    r2 = q.quantize_arrow(batch, bit_width=8)
    assert r2.column("layer_name").to_pylist() == ["layer2", "layer3"]
    expect8 = q.quantize_batch({"layer3": arrays["layer3"]}, bit_width=8)
    assert r2.column("quantized_data")[1].as_py() == expect8["layer3"]["quantized_data"].tobytes()
    # large_list input
    large = table.cast(pa.schema([("layer_name", pa.string()),
                                  ("weights", pa.large_list(pa.float32())),
                                  ("shape", pa.list_(pa.int64()))]))
    assert q.quantize_arrow(large).num_rows == len(arrays)


def test_quantize_arrow_rejects_bad_input():
    arrays, table = arrow_input(2)
    q = v2.ArrowQuantV2()
    bad_shape = table.set_column(2, "shape", pa.array([[3, 3], [1, 2]], pa.list_(pa.int64())))
    with pytest.raises(v2.ShapeMismatchError, match="layer0"):
        q.quantize_arrow(bad_shape)
    with pytest.raises(v2.ValidationError, match="weights"):
        q.quantize_arrow(table.drop_columns(["weights"]))
    with pytest.raises(v2.ValidationError):
        q.quantize_arrow({"layer_name": []})


def test_sharded_loader(sharded, tmp_path):
    src, tensors = sharded
    loader = v2.ShardedSafeTensorsLoader(src)
    assert sorted(loader.tensor_names()) == sorted(tensors)
    assert loader.num_shards() == 2
    assert [Path(f).name for f in loader.shard_files()] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert loader.get_total_size() == sum(a.nbytes for a in tensors.values())
    for name, a in tensors.items():
        got = loader.get_tensor(name)
        assert got.dtype == np.float32 and got.shape == a.shape
        np.testing.assert_array_equal(got, a.astype(np.float32))
    assert loader.detect_modality() == "text"
    with pytest.raises(v2.ModelNotFoundError):
        loader.get_tensor("missing")
    all_t = v2.load_sharded_safetensors(src)
    assert set(all_t) == set(tensors)
    # Modality from tensor names (a UNet) and from metadata.json.
    unet = tmp_path / "unet"
    unet.mkdir()
    st.save_file({"down_blocks.0.resnets.0.conv1.weight": np.ones((4, 4, 3, 3), np.float32)},
                 str(unet / "diffusion_pytorch_model.safetensors"))
    assert v2.ShardedSafeTensorsLoader(unet).detect_modality() == "image"
    (unet / "metadata.json").write_text(json.dumps({"modality": "audio"}))
    assert v2.ShardedSafeTensorsLoader(unet).detect_modality() == "audio"
    (src / "config.json").write_text(json.dumps({"model_type": "starcoder"}))
    assert v2.ShardedSafeTensorsLoader(src).detect_modality() == "code"


def test_async_quantize_awaits_async_callbacks_in_order(sharded, tmp_path):
    src, tensors = sharded
    seen = []
    ticks = 0

    async def callback(message, fraction):
        await asyncio.sleep(0)
        seen.append(fraction)

    async def ticker(stop):
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def main():
        stop = asyncio.Event()
        t = asyncio.ensure_future(ticker(stop))
        q = v2.AsyncArrowQuantV2()
        r = await q.quantize_diffusion_model_async(src, tmp_path / "q", progress_callback=callback)
        stop.set()
        await t
        report = await q.validate_quality_async(src, tmp_path / "q")
        return r, report

    r, report = asyncio.run(main())
    assert r["bit_width"] == 4
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert ticks > 0  # the event loop kept running while the engine worked
    assert report["passed"]


def test_async_multiple_models_with_model_index(tmp_path):
    srcs = [write_sharded(tmp_path / f"m{i}", llm_tensors(seed=i, layers=1)) for i in range(2)]
    events = []

    def cb(index, message, fraction):
        events.append((index, fraction))

    async def main():
        q = v2.AsyncArrowQuantV2()
        return await q.quantize_multiple_models_async(
            [{"model_path": srcs[0], "output_path": tmp_path / "o0"},
             (srcs[1], tmp_path / "o1", {"bit_width": 8})], progress_callback=cb)

    results = asyncio.run(main())
    assert [r["bit_width"] for r in results] == [4, 8]
    assert {i for i, _ in events} == {0, 1}
    for i in (0, 1):
        fr = [f for j, f in events if j == i]
        assert fr[-1] == 1.0 and fr == sorted(fr)

    async def failing():
        q = v2.AsyncArrowQuantV2()
        return await q.quantize_multiple_models_async(
            [(srcs[0], tmp_path / "o2"), (tmp_path / "missing", tmp_path / "o3")],
            return_exceptions=True)

    mixed = asyncio.run(failing())
    assert mixed[0]["bit_width"] == 4 and isinstance(mixed[1], v2.ModelNotFoundError)


def test_async_cancel_stops_the_engine(tmp_path):
    rng = np.random.default_rng(0)
    big = {f"layer{i}.weight": rng.standard_normal((256, 512)).astype(np.float32) for i in range(40)}
    src = write_sharded(tmp_path / "big", big, shards=1)
    out = tmp_path / "q"

    async def main():
        q = v2.AsyncArrowQuantV2()
        started = asyncio.Event()

        async def cb(message, fraction):
            started.set()

        task = asyncio.ensure_future(q.quantize_diffusion_model_async(src, out, progress_callback=cb))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # Stopped before the end: nothing that looks finished.
    assert not (out / "metadata.json").exists()
