"""Diffusion GGUF layouts (arrowquant.formats.gguf.diffusion) on tiny random
diffusers models: names, types, F32 rules and orig_shape keys read back with
gguf-py's GGUFReader, and the sdcpp names converted back to diffusers by
diffusers' own single-file loader (an independent implementation of the
original <-> diffusers correspondence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from arrowquant.errors import ConfigurationError, MetadataError  # noqa: E402
from arrowquant.formats.gguf import diffusion as dg  # noqa: E402
from arrowquant.formats.gguf import diffusion_types as dt  # noqa: E402
from arrowquant.formats.gguf.diffusion_names import (detect_reference_family,  # noqa: E402
                                                     strip_reference_prefix)

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from arrowquant.synthetic_diffusion import tiny_flux_config, tiny_unet_config

    root = tmp_path_factory.mktemp("tinydiff")
    torch.manual_seed(0)
    pipe = root / "pipe"
    diffusers.UNet2DConditionModel(**tiny_unet_config()).save_pretrained(pipe / "unet")
    diffusers.AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
                            latent_channels=4).save_pretrained(pipe / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    diffusers.UNet2DConditionModel(**tiny_unet_config(sdxl=True)).save_pretrained(root / "unetxl")
    # 256 wide: rows of a multiple of 256, so the K types apply (FLUX is never rearranged)
    diffusers.FluxTransformer2DModel(**tiny_flux_config(width=256)).save_pretrained(root / "flux")
    return root


def _export(src, out, **kw):
    return dg.export_diffusion_gguf(src, out, overwrite=True, progress=False, **kw)


def _reader(path):
    return gguf.GGUFReader(str(path))


def _field_str(r, key):
    f = r.get_field(key)
    return None if f is None else str(bytes(f.parts[f.data[-1]]), "utf-8")


def _source_tensors(d: Path):
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------ sdcpp layout


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_sdcpp_names_round_trip_through_diffusers_single_file_loader(tiny, tmp_path, component):
    """diffusers converts the original names of our F32 file back (its
    convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint): the model it
    builds equals the source model exactly."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = tmp_path / "sd.gguf"
    rep = _export(tiny / "pipe", out, gguf_type="F32", layout="sdcpp")
    assert rep["layout"] == "sdcpp" and rep["family"] == "sd1"
    cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
    got = cls.from_single_file(str(out), config=str(tiny / "pipe" / component)).state_dict()
    ref = cls.from_pretrained(str(tiny / "pipe" / component)).state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_sdcpp_sdxl_unet_round_trip(tiny, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    out = tmp_path / "xl.gguf"
    rep = _export(tiny / "unetxl", out, gguf_type="F32", layout="sdcpp")
    assert rep["family"] == "sdxl"
    names = {t.name for t in _reader(out).tensors}
    assert "model.diffusion_model.label_emb.0.0.weight" in names
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in names  # SDXL's upsampler slot
    got = UNet2DConditionModel.from_single_file(str(out), config=str(tiny / "unetxl")).state_dict()
    ref = UNet2DConditionModel.from_pretrained(str(tiny / "unetxl")).state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_sdcpp_layout_prefixes_types_and_rules(tiny, tmp_path):
    out = tmp_path / "q4.gguf"
    rep = _export(tiny / "pipe", out, gguf_type="Q4_0", layout="sdcpp")
    r = _reader(out)
    assert r.get_field("general.architecture") is None  # as sd.cpp's own files
    assert _field_str(r, "arrowquant.layout") == "sdcpp"
    byname = {t.name: t for t in r.tensors}
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(n.startswith(prefixes) for n in byname)
    for p in prefixes:
        assert any(n.startswith(p) for n in byname), p
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in byname
    # LDM slots sd.cpp builds its UNet from (its SD 1.x upsampler after a block
    # without attention sits at .1, after one with attention at .2)
    for n in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight",
              "output_blocks.5.2.conv.weight", "middle_block.1.proj_in.weight",
              "input_blocks.1.0.emb_layers.1.weight", "output_blocks.0.0.skip_connection.weight"):
        assert "model.diffusion_model." + n in byname, n
    # The VAE's attention projections are 1x1 convolutions, as in the original.
    q = byname["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert list(q.shape) == [1, 1, 64, 64]
    detail = {d["name"]: d for d in rep["tensors_detail"]}
    for n, t in byname.items():
        d = detail[n]
        assert t.tensor_type.name == d["gguf_type"]
        if len(d["shape"]) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, n
        if t.tensor_type in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
            assert d["shape"][-1] % 32 == 0, n
        if any(k in n for k in ("time_embed.", "embedding")):
            assert t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16), n
        if "emb_layers" in n and n.endswith(".weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, n  # timestep rule
    conv = byname["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert conv.tensor_type == gguf.GGMLQuantizationType.F32  # 3x3: row of 3, fallback
    assert detail["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]["fallback"]
    assert byname["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] \
        .tensor_type == gguf.GGMLQuantizationType.Q4_0


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0"])
def test_sdcpp_values_match_source(tiny, tmp_path, gtype):
    """Every stored tensor decodes (gguf-py) to its source values: exactly for
    F32; quantized ones no worse than gguf-py's reference rounding of the
    same values (the engine's search keeps the better of both)."""
    out = tmp_path / "q.gguf"
    _export(tiny / "pipe", out, gguf_type=gtype, layout="sdcpp")
    src = _source_tensors(tiny / "pipe" / "unet")
    names = {o.name: o.source_names[0] for o in
             dg.plan_tensors(dg.find_components(tiny / "pipe")[0], "sdcpp")[0]}
    n_checked = n_quant = 0
    for t in _reader(out).tensors:
        if not t.name.startswith("model.diffusion_model."):
            continue
        x = src[names[t.name]].astype(np.float32)
        y = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(x.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(x, y), t.name
        else:
            rtn = gguf.quants.dequantize(gguf.quants.quantize(x, t.tensor_type), t.tensor_type)
            assert np.sum((x - y) ** 2) <= np.sum((x - rtn) ** 2) * (1 + 1e-5), t.name
            n_quant += 1
        n_checked += 1
    assert n_checked > 100 and n_quant > 20


def test_sdcpp_flux_is_a_separate_diffusion_model_file(tiny, tmp_path):
    out = tmp_path / "flux.gguf"
    rep = _export(tiny / "flux", out, gguf_type="Q8_0", layout="sdcpp")
    names = {t.name for t in _reader(out).tensors}
    assert rep["family"] == "flux"
    assert all(n.startswith("model.diffusion_model.") for n in names)
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in names
    assert "model.diffusion_model.single_blocks.0.linear1.weight" in names


# ------------------------------------------------------------ comfy layout


def test_comfy_sd1_conformance(tiny, tmp_path):
    """ComfyUI-GGUF's rules: architecture key, prefix-free reference names,
    1-D / <= 1024-element tensors F32, orig_shape for rearranged convolutions,
    quantized tensors 2-D only, the family's kept tensors unquantized."""
    out = tmp_path / "c.gguf"
    rep = _export(tiny / "pipe", out, gguf_type="Q4_0", layout="comfy")
    r = _reader(out)
    assert _field_str(r, "general.architecture") == "sd1"
    assert "vae/ not written" in " ".join(rep["notes"])
    plan = {o.name: o for o in dg.plan_tensors(dg.find_components(tiny / "pipe")[0], "comfy")[0]}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(plan)
    assert not any(n.startswith(("model.", "first_stage_model.", "cond_stage_model.")) for n in tensors)
    n_fix = 0
    for n, t in tensors.items():
        shape = plan[n].shape
        numel = math.prod(shape)
        key = f"comfy.gguf.orig_shape.{n}"
        f = r.get_field(key)
        want_fix = len(shape) > 1 and numel >= 512 and numel % 256 == 0 and shape[-1] % 256 != 0
        if want_fix:
            n_fix += 1
            assert f is not None, n
            assert [int(f.parts[i][0]) for i in f.data] == list(shape)
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            assert list(reversed([int(d) for d in t.shape])) == [numel // 256, 256]
        else:
            assert f is None, n
        if len(shape) == 1 or numel <= 1024:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, n
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            assert len([d for d in t.shape]) == 2, n
        if any(k in n for k in ("time_embed.", "conv_in.", "conv_out.")) or n in ("input_blocks.0.0.weight",
                                                                                    "out.2.weight"):
            assert t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16), n
        if ".ff.net.2.weight" in n:  # the patch's Q4_0 mix: down projections Q4_1
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1, n
    assert n_fix > 10
    # A rearranged convolution decodes back to its source values once viewed with orig_shape.
    name = "input_blocks.1.0.in_layers.2.weight"
    src = _source_tensors(tiny / "pipe" / "unet")["down_blocks.0.resnets.0.conv1.weight"]
    t = tensors[name]
    y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
    err = np.abs(y - src).max()
    assert err <= np.abs(src).max() / 8 * 1.01


def test_comfy_flux_reference_names_fusion_and_swap(tiny, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "flux.gguf"
    _export(tiny / "flux", out, gguf_type="F32", layout="comfy")
    r = _reader(out)
    assert _field_str(r, "general.architecture") == "flux"
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type) for x in r.tensors}
    src = load_file(str(tiny / "flux" / "diffusion_pytorch_model.safetensors"))
    b = "transformer_blocks.0.attn."
    np.testing.assert_array_equal(t["double_blocks.0.img_attn.qkv.weight"],
                                  np.concatenate([src[b + "to_q.weight"], src[b + "to_k.weight"],
                                                  src[b + "to_v.weight"]]))
    np.testing.assert_array_equal(t["double_blocks.0.txt_attn.qkv.bias"],
                                  np.concatenate([src[b + "add_q_proj.bias"], src[b + "add_k_proj.bias"],
                                                  src[b + "add_v_proj.bias"]]))
    s = "single_transformer_blocks.0."
    np.testing.assert_array_equal(t["single_blocks.0.linear1.weight"],
                                  np.concatenate([src[s + "attn.to_q.weight"], src[s + "attn.to_k.weight"],
                                                  src[s + "attn.to_v.weight"], src[s + "proj_mlp.weight"]]))
    w = src["norm_out.linear.weight"]
    h = w.shape[0] // 2
    np.testing.assert_array_equal(t["final_layer.adaLN_modulation.1.weight"],
                                  np.concatenate([w[h:], w[:h]]))
    np.testing.assert_array_equal(t["double_blocks.0.img_attn.norm.query_norm.scale"],
                                  src[b + "norm_q.weight"])
    assert detect_reference_family(t) == ("flux", False)


def test_comfy_flux_kept_layers_and_timestep_rule(tiny, tmp_path):
    out = tmp_path / "fq.gguf"
    rep = _export(tiny / "flux", out, gguf_type="Q4_0", layout="comfy")
    types = {x.name: x.tensor_type.name for x in _reader(out).tensors}
    for n, ty in types.items():
        if n.startswith(("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")):
            assert ty in ("F16", "F32"), n
        if "_mod.lin.weight" in n or "modulation.lin.weight" in n:
            assert ty == "Q8_0", n
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_0"
    rules = {d["name"]: d["rule"] for d in rep["tensors_detail"]}
    assert rules["txt_in.weight"] == "comfy-keep"


def test_comfy_single_file_reference_checkpoint(tiny, tmp_path):
    """A reference checkpoint with model.diffusion_model. and other prefixes:
    the prefix is stripped and the other keys are left out (ComfyUI-GGUF)."""
    from safetensors.numpy import save_file

    sd_file = tmp_path / "ref.gguf"
    _export(tiny / "pipe", sd_file, gguf_type="F32", layout="sdcpp")
    tensors = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type))
               for t in _reader(sd_file).tensors}
    tensors["alphas_cumprod"] = np.ones(4, np.float32)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(tensors, str(ckpt))
    out = tmp_path / "c.gguf"
    rep = _export(ckpt, out, gguf_type="Q8_0", layout="comfy")
    names = {t.name for t in _reader(out).tensors}
    assert rep["family"] == "sd1" and rep["input_kind"] == "single-file"
    assert "input_blocks.0.0.weight" in names and not any(n.startswith("first_stage") for n in names)
    assert any(s["name"].startswith("first_stage_model.") for s in rep["skipped"])
    # sdcpp from the same checkpoint keeps every component and drops training state.
    out2 = tmp_path / "s.gguf"
    rep2 = _export(ckpt, out2, gguf_type="Q8_0", layout="sdcpp")
    names2 = {t.name for t in _reader(out2).tensors}
    assert names2 == set(tensors) - {"alphas_cumprod"}
    assert any(s["name"] == "alphas_cumprod" for s in rep2["skipped"])


def test_prefix_and_family_detection():
    assert strip_reference_prefix(["model.diffusion_model.a", "first_stage_model.b"]) == \
        ("model.diffusion_model.", ["model.diffusion_model.a"])
    assert strip_reference_prefix(["net.a", "net.b"])[0] == "net."
    assert strip_reference_prefix(["net.a", "b"])[0] == ""
    assert detect_reference_family(["transformer_blocks.0.attn.norm_added_k.weight"]) == ("flux", True)
    assert detect_reference_family(["joint_blocks.0.x_block.attn.qkv.weight"]) == ("sd3", False)
    assert detect_reference_family(["x"]) == (None, False)


def test_choose_tensor_type_rules():
    c = dt.choose_tensor_type
    assert c("a.norm.weight", (320,), (320,), "float16", "Q4_0", "sdcpp", "sd1").gguf_type == "F32"
    d = c("x.to_q.weight", (320, 100), (320, 100), "float16", "Q4_0", "sdcpp", "sd1")
    assert (d.gguf_type, d.fallback) == ("F16", True)
    d = c("x.to_q.weight", (320, 100), (320, 100), "float32", "Q4_0", "sdcpp", "sd1")
    assert d.gguf_type == "F32"
    assert c("x.to_q.weight", (320, 100), (320, 100), "float32", "Q4_0", "comfy", "sd1").gguf_type == "F16"
    assert c("model.diffusion_model.time_embed.0.weight", (1280, 320), (1280, 320), "float16", "Q4_0",
             "sdcpp", "sd1").rule == "sdcpp-keep"
    d = c("double_blocks.0.img_mod.lin.weight", (384, 64), (384, 64), "float32", "Q4_0", "comfy", "flux")
    assert (d.gguf_type, d.rule) == ("Q8_0", "timestep")
    assert c("w", (8, 64), (8, 64), "float32", "Q4_0", "comfy", "flux").rule == "comfy-small"
    assert c("a.modulation", (1, 6, 512), (1, 6, 512), "float32", "Q8_0", "comfy", "wan").rule == "comfy-hiprec"
    mix = dt.MixState()
    d = c("blk.ff.net.2.weight", (64, 256), (64, 256), "float32", "Q4_0", "comfy", "sd1", mix=mix)
    assert (d.gguf_type, d.rule) == ("Q4_1", "comfy-mix")
    with pytest.raises(ConfigurationError):
        c("w", (64, 64), (64, 64), "float32", "Q4_K_M", "comfy", "sd1", writable=("Q8_0", "F16"))


def test_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(ConfigurationError, match="layout"):
        _export(tiny / "flux", tmp_path / "x.gguf", gguf_type="Q8_0", layout="llama")
    with pytest.raises(ConfigurationError, match="not available"):
        _export(tiny / "flux", tmp_path / "x.gguf", gguf_type="Q9_9", layout="comfy")
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"foo.weight": np.zeros((4, 4), np.float32)}, str(bad))
    with pytest.raises(MetadataError, match="unknown diffusion architecture"):
        _export(bad, tmp_path / "y.gguf", gguf_type="Q8_0", layout="comfy")
    from arrowquant.formats.gguf.diffusion_names import unet_to_original

    with pytest.raises(MetadataError, match="'foo.weight'"):
        unet_to_original({"foo.weight": (4, 4)}, {"down_block_types": ["DownBlock2D"],
                                                  "up_block_types": ["UpBlock2D"], "layers_per_block": 1})


def test_cli_routes_diffusion_inputs(tiny, tmp_path, capsys):
    from arrowquant.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["quantize", str(tiny / "flux"), str(out), "--format", "gguf", "--gguf-type", "Q4_K_M",
                 "--gguf-layout", "comfy", "--no-progress", "-v"]) == 0
    text = capsys.readouterr().out
    assert "comfy layout, family flux" in text and "comfy-mix" in text
    r = _reader(out)
    assert _field_str(r, "general.architecture") == "flux"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q5_K"  # Q4_K_M: fused qkv one type up
    assert types["double_blocks.0.img_attn.proj.weight"] == "Q4_K"
    out2 = tmp_path / "cli2.gguf"
    assert main(["export-gguf", str(tiny / "pipe"), str(out2), "--gguf-type", "Q4_0", "--json",
                 "--max-memory", "16MiB"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layout"] == "sdcpp" and rep["chunk_bytes"] == 4 << 20


def test_small_chunks_give_identical_files(tiny, tmp_path):
    """Row chunking (with the carry between chunks of a rearranged tensor, and
    chunks smaller than one source row) does not change a byte."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    rep = _export(tiny / "pipe", a, gguf_type="Q4_0", layout="comfy", chunk_bytes=200)
    _export(tiny / "pipe", b, gguf_type="Q4_0", layout="comfy", max_memory=1 << 30)
    assert a.read_bytes() == b.read_bytes()
    assert max(d["chunks"] for d in rep["tensors_detail"]) > 10
    c, d = tmp_path / "c.gguf", tmp_path / "d.gguf"
    _export(tiny / "flux", c, gguf_type="Q8_0", layout="sdcpp", chunk_bytes=100)
    _export(tiny / "flux", d, gguf_type="Q8_0", layout="sdcpp")
    assert c.read_bytes() == d.read_bytes()


def test_block_mode_per_component(tiny, tmp_path):
    """block_mode={"text_encoder": "reference"}: the text encoder's blocks are
    llama.cpp's reference rounding (gguf-py's quantize, byte for byte), the
    UNet's are searched (not all equal to the rounding)."""
    out = tmp_path / "m.gguf"
    rep = _export(tiny / "pipe", out, gguf_type="Q4_0", layout="sdcpp",
                  block_mode={"text_encoder": "reference"})
    r = _reader(out)
    assert "text_encoder" in _field_str(r, "arrowquant.block_mode")
    src = {**_source_tensors(tiny / "pipe" / "text_encoder"), **_source_tensors(tiny / "pipe" / "unet")}
    names = {o.name: o.source_names[0] for o in
             dg.plan_tensors(dg.find_components(tiny / "pipe")[0], "sdcpp")[0]}
    same = {"text": [], "unet": []}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        key = "text" if t.name.startswith("cond_stage_model.") else "unet"
        x = src[names[t.name]].astype(np.float32)
        same[key].append(np.array_equal(np.asarray(t.data).reshape(-1),
                                        gguf.quants.quantize(x, t.tensor_type).reshape(-1)))
    assert same["text"] and all(same["text"])
    assert same["unet"] and not all(same["unet"])
    with pytest.raises(ConfigurationError):
        _export(tiny / "flux", tmp_path / "x.gguf", gguf_type="Q4_0", block_mode="fast")


def test_default_block_mode_rounds_the_text_encoder_and_reports_it(tiny, tmp_path):
    """The default (DEFAULT_BLOCK_MODE, from the measured renders) writes the
    same file as asking for the text encoder rounded explicitly, and every
    block-quantized tensor's record says how its blocks were chosen."""
    a, b = tmp_path / "default.gguf", tmp_path / "explicit.gguf"
    rep = _export(tiny / "pipe", a, gguf_type="Q4_0", layout="sdcpp")
    _export(tiny / "pipe", b, gguf_type="Q4_0", layout="sdcpp",
            block_mode={"text_encoder": "reference", "*": "search"})
    assert a.read_bytes() == b.read_bytes()
    modes = {(r["component"], r["block_mode"]) for r in rep["tensors_detail"] if r["gguf_type"] == "Q4_0"}
    assert ("text_encoder", "reference") in modes and ("unet", "search") in modes
    assert all(r["block_mode"] is None for r in rep["tensors_detail"] if r["gguf_type"] in ("F16", "F32"))


def test_target_bpw_spends_the_budget_by_measured_error(tiny, tmp_path):
    """--target-bpw on a diffusion layout: the tensors the layout leaves to
    the target type get the types of least measured error under the budget
    (every tensor counted with its bytes); more bits buy less error; the
    protected tensors (1-D F32, timestep Q8_0, ComfyUI's kept ones) keep
    their rules' types; the report says what each got and why."""
    reps = {}
    for bpw in (6.5, 7.5):
        out = tmp_path / f"b{bpw}.gguf"
        reps[bpw] = rep = _export(tiny / "flux", out, gguf_type="Q4_K", layout="comfy",
                                  target_bpw=bpw)
        a = rep["allocation"]
        assert a["target_bpw"] == bpw and a["planned_bpw"] <= bpw and a["measured"] > 0
        assert 8 * out.stat().st_size / rep["params"] <= bpw + 0.05
        chosen = [r for r in rep["tensors_detail"] if r["rule"] == "target-bpw"]
        assert chosen and all("--target-bpw" in r["reason"] and "dB" in r["reason"] for r in chosen)
        assert all(r["gguf_type"] == "F32" for r in rep["tensors_detail"] if len(r["shape"]) == 1)
        assert all(r["gguf_type"] == "Q8_0" for r in rep["tensors_detail"] if r["rule"] == "timestep")
        assert "--target-bpw" in dg.format_report(rep)
        r = _reader(out)  # the file decodes with gguf-py
        for t in r.tensors:
            if t.tensor_type.name not in ("F16", "F32"):
                gguf.quants.dequantize(t.data, t.tensor_type)

    def err(rep):
        q = [r for r in rep["tensors_detail"] if r["rule"] == "target-bpw"]
        return sum(r["rel_mse"] * math.prod(r["shape"]) for r in q)

    assert len({r["gguf_type"] for r in reps[6.5]["tensors_detail"] if r["rule"] == "target-bpw"}) > 1
    assert err(reps[7.5]) < err(reps[6.5])
    with pytest.raises(ConfigurationError, match="below what this file can be"):
        _export(tiny / "flux", tmp_path / "x.gguf", gguf_type="Q4_K", layout="comfy", target_bpw=2)


def test_calibration_weights_the_diffusion_gguf_search(tiny, tmp_path):
    """--calibration on a diffusion layout: the unfused tensors the
    statistics cover are searched with their columns' importance (lower
    importance-weighted error than the plain search), the others as before."""
    from arrowquant.calibration.stats import CalibrationStats, GroupStats
    from safetensors.numpy import load_file

    src = load_file(str(next((tiny / "flux").glob("*.safetensors"))))
    layer = "single_transformer_blocks.0.proj_out"
    x = src[layer + ".weight"].astype(np.float32)
    rng = np.random.default_rng(0)
    ms = (rng.gamma(0.5, size=x.shape[1]) + 1e-3).astype(np.float32)
    stats = CalibrationStats(groups={layer: {0: GroupStats(16, np.zeros_like(ms), ms, np.sqrt(ms))}},
                             num_time_groups=1)
    plain = _export(tiny / "flux", tmp_path / "p.gguf", gguf_type="Q4_K", layout="comfy")
    cal = _export(tiny / "flux", tmp_path / "c.gguf", gguf_type="Q4_K", layout="comfy",
                  calibration=stats)
    assert not plain["importance_weighted"]
    assert cal["importance_weighted"] == ["single_blocks.0.linear2.weight"]
    errs = []
    for path in (tmp_path / "p.gguf", tmp_path / "c.gguf"):
        t = next(t for t in _reader(path).tensors if t.name == "single_blocks.0.linear2.weight")
        y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
        errs.append(float(np.sum((x - y) ** 2 * ms)))
    assert errs[1] < errs[0]
