"""Modality detection: rule order, hand-made metadata and configs, real layouts."""

from __future__ import annotations

import json
import struct

import pytest

from arrowquant.config import DiffusionQuantConfig
from arrowquant.errors import MetadataError
from arrowquant.sources.modality import detect_modality

LLAMA_NAMES = [
    "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight", "lm_head.weight",
]
UNET_NAMES = [
    "conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
    "down_blocks.0.resnets.0.time_emb_proj.weight", "mid_block.attentions.0.to_q.weight",
    "up_blocks.0.resnets.0.conv2.weight", "conv_norm_out.weight", "conv_out.weight",
]
VOCODER_NAMES = ["conv_pre.weight", "ups.0.weight", "ups.1.weight", "conv_post.weight",
                 "mel_filters"]


def write_json(path, obj):
    path.write_text(json.dumps(obj))


def write_safetensors(path, metadata):
    """A SafeTensors file with one float32 scalar and the given __metadata__."""
    header = {"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0\0\0\0")


# ------------------------------------------------------------------ rule order


def test_config_wins_over_everything(tmp_path):
    write_json(tmp_path / "metadata.json", {"modality": "text"})
    d = detect_modality(tmp_path, LLAMA_NAMES, config=DiffusionQuantConfig(modality="audio"))
    assert (d.modality, d.rule) == ("audio", "config")
    assert "modality='audio'" in d.evidence
    assert detect_modality(None, [], config="image").modality == "image"


def test_metadata_json_before_safetensors_and_config_json(tmp_path):
    write_json(tmp_path / "metadata.json", {"modality": "code", "source": "gen"})
    write_safetensors(tmp_path / "model.safetensors", {"modality": "image"})
    write_json(tmp_path / "config.json", {"_class_name": "UNet2DModel"})
    d = detect_modality(tmp_path, UNET_NAMES)
    assert (d.modality, d.rule) == ("code", "metadata.json")
    # A file path finds the directory's metadata.json too.
    assert detect_modality(tmp_path / "model.safetensors", []).rule == "metadata.json"
    # Without modality in metadata.json the next rule decides.
    write_json(tmp_path / "metadata.json", {"source": "gen"})
    d = detect_modality(tmp_path, UNET_NAMES)
    assert (d.modality, d.rule) == ("image", "safetensors-metadata")
    assert "model.safetensors __metadata__" in d.evidence


def test_safetensors_metadata_given_and_index(tmp_path):
    d = detect_modality(tmp_path, LLAMA_NAMES, metadata={"format": "pt", "modality": "audio"})
    assert (d.modality, d.rule) == ("audio", "safetensors-metadata")
    write_json(tmp_path / "model.safetensors.index.json",
               {"metadata": {"total_size": 8, "modality": "text"}, "weight_map": {}})
    write_safetensors(tmp_path / "model-00001-of-00001.safetensors", {"format": "pt"})
    d = detect_modality(tmp_path, UNET_NAMES)
    assert (d.modality, d.rule) == ("text", "safetensors-metadata")
    assert "index.json metadata" in d.evidence


def test_bad_modality_values_are_metadata_errors(tmp_path):
    write_json(tmp_path / "metadata.json", {"modality": "video"})
    with pytest.raises(MetadataError, match="modality 'video' is not one of text, code"):
        detect_modality(tmp_path, [])
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(MetadataError, match="cannot read JSON"):
        detect_modality(tmp_path, [])


def test_truncated_safetensors_header_is_a_metadata_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(MetadataError, match="too short"):
        detect_modality(tmp_path, [])


# ------------------------------------------------------------------ config.json


@pytest.mark.parametrize("cfg,modality,needle", [
    ({"_class_name": "UNet2DConditionModel"}, "image", "_class_name='UNet2DConditionModel'"),
    ({"_class_name": "DiTTransformer2DModel"}, "image", "DiTTransformer2DModel"),
    ({"_class_name": "AutoencoderKL"}, "image", "AutoencoderKL"),
    ({"_class_name": "UNet1DModel"}, "audio", "UNet1DModel"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "text", "text model type"),
    ({"architectures": ["BertModel"], "model_type": "bert"}, "text", "'bert'"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "text", "qwen2"),
    ({"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode"}, "code",
     "code model"),
    ({"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2"}, "code", "starcoder"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "_name_or_path": "codellama/CodeLlama-7b-hf"}, "code", "names a code model"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "_name_or_path": "deepseek-ai/deepseek-coder-1.3b-base"}, "code", "names a code model"),
    ({"architectures": ["EncoderDecoderModel"], "model_type": "encoder-decoder",
      "_name_or_path": "bert-encoder-decoder"}, None, None),
    ({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}, "audio",
     "whisper"),
    ({"model_type": "wav2vec2"}, "audio", "audio model type"),
    ({"architectures": ["ViTForImageClassification"], "model_type": "vit"}, "image", "vit"),
    ({"model_type": "clip_vision_model"}, "image", "image model type"),
    ({"architectures": ["MyNewModelForCausalLM"], "model_type": "mynew"}, "text",
     "a text task head"),
])
def test_config_json(tmp_path, cfg, modality, needle):
    write_json(tmp_path / "config.json", cfg)
    d = detect_modality(tmp_path, [])
    if modality is None:  # not decidable from this config: falls through to names
        assert (d.modality, d.rule) == ("unknown", "none")
        return
    assert (d.modality, d.rule) == (modality, "config.json"), d
    assert needle in d.evidence


def test_model_index_json_pipeline_and_component(tmp_path):
    write_json(tmp_path / "model_index.json", {"_class_name": "DDPMPipeline",
                                               "unet": ["diffusers", "UNet2DModel"]})
    d = detect_modality(tmp_path, [])
    assert (d.modality, d.rule) == ("image", "model_index.json")
    # An audio pipeline's UNet (a class used for images too) is audio.
    pipe = tmp_path / "audioldm"
    (pipe / "unet").mkdir(parents=True)
    write_json(pipe / "model_index.json", {"_class_name": "AudioLDMPipeline"})
    write_json(pipe / "unet" / "config.json", {"_class_name": "UNet2DConditionModel"})
    d = detect_modality(pipe / "unet", UNET_NAMES)
    assert (d.modality, d.rule) == ("audio", "model_index.json")
    assert "../model_index.json" in d.evidence and "AudioLDMPipeline" in d.evidence


# ------------------------------------------------------------------ tensor names


def test_tensor_names_with_counts(tmp_path):
    d = detect_modality(tmp_path, LLAMA_NAMES)
    assert (d.modality, d.rule) == ("text", "tensor-names")
    assert d.counts["text"] == 9 and d.counts["image"] == 0  # model.norm.weight matches none
    assert "9 of 10 tensor names look text" in d.evidence
    d = detect_modality(None, UNET_NAMES)
    assert (d.modality, d.rule) == ("image", "tensor-names") and d.counts["image"] == 8
    d = detect_modality(None, VOCODER_NAMES)
    assert (d.modality, d.rule) == ("audio", "tensor-names")


def test_mel_does_not_match_inside_words():
    d = detect_modality(None, ["model.melody_head.weight", "encoder.smelt.weight"])
    assert d.counts["audio"] == 1  # "melody" starts with "mel"; "smelt" does not


def test_unknown_and_ties():
    d = detect_modality(None, ["a.weight", "b.weight"])
    assert (d.modality, d.rule) == ("unknown", "none")
    d = detect_modality(None, ["lm_head.weight", "conv_in.weight"])
    assert (d.modality, d.rule) == ("unknown", "none") and "tie" in d.evidence
    assert d.as_dict()["counts"] == {"text": 1, "image": 1, "audio": 0}


# ------------------------------------------------------------------ real layouts


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(root / "llama", max_shard_size="20KB")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(root / "unet")
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    dit.save_pretrained(root / "dit")
    names = {
        "llama": list(llama.state_dict()),
        "unet": list(unet.state_dict()),
        "dit": list(dit.state_dict()),
    }
    return root, names


@pytest.mark.parametrize("which,modality,needle", [
    ("llama", "text", "LlamaForCausalLM"),
    ("unet", "image", "UNet2DModel"),
    ("dit", "image", "DiTTransformer2DModel"),
])
def test_real_layouts_by_config(real_layouts, which, modality, needle):
    root, names = real_layouts
    d = detect_modality(root / which, names[which])
    assert (d.modality, d.rule) == (modality, "config.json")
    assert needle in d.evidence


@pytest.mark.parametrize("which,modality", [("llama", "text"), ("unet", "image"),
                                            ("dit", "image")])
def test_real_layouts_by_tensor_names(real_layouts, which, modality, tmp_path):
    # The same tensors with no files beside them: the names alone decide.
    _, names = real_layouts
    d = detect_modality(tmp_path, names[which])
    assert (d.modality, d.rule) == (modality, "tensor-names")
    assert d.counts[modality] > 0


def test_real_sharded_index_metadata_has_no_modality(real_layouts):
    # transformers writes total_size/total_parameters in the index: not a decision.
    root, names = real_layouts
    index = json.loads((root / "llama" / "model.safetensors.index.json").read_text())
    assert "modality" not in index["metadata"]
    assert detect_modality(root / "llama", names["llama"]).rule == "config.json"
