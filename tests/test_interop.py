"""Inputs made by code no one here wrote (safetensors, transformers,
diffusers save_pretrained) and outputs read by other readers (pyarrow,
DuckDB, safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq
from arrowquant import engine

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def test_safetensors_package_file_all_dtypes(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    tensors = {
        "f32.weight": rng.standard_normal((40, 70)).astype(np.float32),
        "f16.weight": rng.standard_normal((33, 64)).astype(np.float16),
        "bf16.weight": rng.standard_normal((16, 128)).astype(ml_dtypes.bfloat16),
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float16),
        "bias": rng.standard_normal(70).astype(np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
        "ids": np.arange(12, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors, str(src))
    out = tmp_path / "out"
    aq.quantize(src, out, bits=8, group_size=32, progress=False)
    model = aq.load(out)
    assert set(model) == set(tensors)
    for name, a in tensors.items():
        e = model.info(name)
        if a.ndim >= 2:
            assert e.quant_type == "int8"
            expect = engine.quantize_array(a, bits=8, group_size=32, method="mse",
                                           param_dtype="float16")
            assert model.raw(name).data.tobytes() == expect.data.tobytes()
        else:
            assert e.quant_type == "none"
            got = model[name]
            np.testing.assert_array_equal(got, a if a.dtype.kind != "V" else a.astype(np.float32))
    # Back to SafeTensors, loadable by the safetensors package.
    deq = tmp_path / "deq.safetensors"
    aq.dequantize(out, deq, dtype="float32")
    back = safetensors_numpy.load_file(str(deq))
    np.testing.assert_array_equal(back["ids"], tensors["ids"])
    np.testing.assert_array_equal(back["mask"], tensors["mask"])
    np.testing.assert_array_equal(back["f16.weight"], model["f16.weight"])


def test_duckdb_and_pyarrow_read_the_output(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    rng = np.random.default_rng(1)
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"a.weight": rng.standard_normal((64, 64)).astype(np.float16),
                                 "a.bias": np.zeros(64, np.float16)}, str(src))
    out = tmp_path / "out"
    aq.quantize(src, out, progress=False)
    rows = duckdb.sql(f"SELECT layer_name, quant_type, row_count FROM '{out / 'model.parquet'}' "
                      "ORDER BY layer_name").fetchall()
    assert rows == [("a.bias", "none", 1), ("a.weight", "int4", 64)]
    import pyarrow.parquet as pq

    t = pq.read_table(out / "model.parquet")
    assert t.num_rows == 2 and t.column("quant_type").to_pylist() == ["none", "int4"] or \
        sorted(t.column("quant_type").to_pylist()) == ["int4", "none"]


def _torch():
    return pytest.importorskip("torch")


def test_transformers_sharded_llama(tmp_path):
    torch = _torch()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    src = tmp_path / "llama"
    model.save_pretrained(src, max_shard_size="100KB", safe_serialization=True)
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    s = aq.quantize(src, out, bits=8, group_size=32, progress=False)
    assert (out / "config.json").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["source"]["format"] == "safetensors"
    assert s.min_cosine > 0.999
    # Dequantized weights load into the original architecture and run.
    deq = tmp_path / "deq.safetensors"
    aq.dequantize(out, deq, dtype="float32")
    from safetensors.torch import load_file

    state = load_file(str(deq))
    fresh = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        ref = model(ids).logits
        got = fresh(ids).logits
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.99


def test_diffusers_unet_and_pipeline_component_by_component(tmp_path):
    torch = _torch()
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3,
                                 block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=8)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    src = tmp_path / "pipe"
    pipe.save_pretrained(src)
    unet.save_pretrained(tmp_path / "unet_sharded", max_shard_size="200KB")
    assert (tmp_path / "unet_sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    s = aq.quantize(tmp_path / "unet_sharded", tmp_path / "unet_q", bits=8, progress=False)
    assert s.tensors == len(unet.state_dict())

    out = tmp_path / "pipe_q"
    s = aq.quantize(src, out, bits=4, progress=False)
    assert (out / "model_index.json").exists()
    assert (out / "scheduler" / "scheduler_config.json").exists()
    assert (out / "unet" / "metadata.json").exists() and (out / "unet" / "config.json").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["components"] == ["unet"] and meta["copied"] == ["scheduler"]
    with pytest.raises(aq.FormatError, match="load one of its components"):
        aq.load(out)
    unet_q = aq.load(out / "unet")
    assert set(unet_q) == set(unet.state_dict())
    # Resuming a finished pipeline is a no-op.
    again = aq.quantize(src, out, bits=4, resume=True, progress=False)
    assert again.tensors == s.tensors
