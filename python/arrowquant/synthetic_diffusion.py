"""Seeded random diffusion pipelines with real architectures, for the GGUF
runtime tests (stable-diffusion.cpp, diffusers' GGUF loader).

There is no trained diffusion checkpoint offline, so these are the published
architectures (their diffusers / transformers configs, written out below from
the published values) with random weights, drawn from a fixed seed and scaled
the way the layers are initialized for training (PyTorch's default init), so
activations stay in range through a real sampling loop. They are generated
once and cached: a manifest written last marks a complete pipeline, and a
matching one is reused.

The CLIP tokenizer's vocabulary and merges cannot be downloaded, so
`write_tokenizer` builds a small valid byte-level BPE vocabulary (all 256 byte
symbols, their end-of-word forms, a few merges and the two special tokens):
`CLIPTokenizer` loads it and the pipeline directory is complete, but its ids
are not CLIP's. stable-diffusion.cpp carries its own CLIP vocabulary and
ignores the tokenizer folder; the embedding table keeps CLIP's 49408 rows.

Needs torch, diffusers and transformers (the `torch` extra).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .synthetic import MANIFEST_NAME, publish_model_dir  # one manifest convention for both generators

GENERATOR_VERSION = 2

#: stable-diffusion-v1-5 unet/config.json (published values).
SD15_UNET_CONFIG: Dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: stable-diffusion-v1-5 vae/config.json.
SD15_VAE_CONFIG: Dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}

#: The text tower of openai/clip-vit-large-patch14 (SD 1.x's text encoder).
SD15_TEXT_CONFIG: Dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}

#: stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG: Dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon",
}


def default_cache_dir() -> Path:
    """$ARROW_QUANT_CACHE, else ~/.cache/arrowquant."""
    env = os.environ.get("ARROW_QUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "arrowquant"


def _byte_symbols() -> Dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte value: printable
    Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(out_dir: Union[str, Path], model_max_length: int = 77) -> Path:
    """A small valid CLIP BPE tokenizer (vocab.json, merges.txt, configs): the
    256 byte symbols and their end-of-word forms, a handful of merges, and
    <|startoftext|> / <|endoftext|>. Not CLIP's vocabulary (see module doc)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_byte_symbols().values())
    vocab: Dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>", "o f</w>", "i n"]
    for m in merges:
        a, b = m.split(" ")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return out


def _manifest(kind: str, seed: int, dtype: str) -> Dict[str, Any]:
    return {"generator": "arrowquant.synthetic_diffusion", "version": GENERATOR_VERSION,
            "kind": kind, "seed": seed, "dtype": dtype}


def _read_manifest(out: Path) -> Optional[Dict[str, Any]]:
    p = out / MANIFEST_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _build_atomically(out: Path, manifest: Dict[str, Any], build: Any) -> Path:
    if out.exists():
        if _read_manifest(out) == manifest:
            return out
        if any(out.iterdir()) and _read_manifest(out) is None:
            raise FileExistsError(f"{out} exists and was not written by "
                                  "arrowquant.synthetic_diffusion; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        publish_model_dir(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generate_sd15_pipeline(out_dir: Union[str, Path, None] = None, seed: int = 0,
                           dtype: str = "float16") -> Path:
    """A full-size SD 1.5-architecture pipeline (UNet 860M, VAE 84M, CLIP text
    encoder 123M parameters) with seeded random weights, saved as diffusers'
    `save_pretrained` writes it (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/; SafeTensors in `dtype`). One component is in memory
    at a time (float32 while it is built, ~3.5 GB for the UNet)."""
    out = Path(out_dir) if out_dir is not None else \
        default_cache_dir() / f"sd15-random-seed{seed}-{dtype}"

    def build(tmp: Path) -> None:
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tdtype = {"float16": torch.float16, "float32": torch.float32,
                  "bfloat16": torch.bfloat16}[dtype]
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).to(tdtype)
        text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        del text
        _published_clip_names(tmp / "text_encoder" / "model.safetensors")
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**SD15_VAE_CONFIG).to(tdtype)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        del vae
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(tdtype)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        del unet
        PNDMScheduler(**SD15_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        write_tokenizer(tmp / "tokenizer")
        import diffusers
        import transformers

        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "_transformers_version": transformers.__version__,
        }, indent=2) + "\n")

    return _build_atomically(out, _manifest("sd15", seed, dtype), build)


def _published_clip_names(path: Path) -> None:
    """Rewrites a CLIPTextModel SafeTensors file with the names of the
    published SD checkpoints ("text_model." + name): transformers 5 saves the
    text tower without that level, which stable-diffusion.cpp's own diffusers
    loader (and older transformers) do not recognise; transformers 5 still
    loads either."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    renamed = {(k if k.startswith("text_model.") or k.startswith("text_projection") else
                "text_model." + k): v for k, v in tensors.items()}
    del tensors
    save_file(renamed, str(path), metadata={"format": "pt"})


def tiny_unet_config(cross_attention_dim: int = 32, sdxl: bool = False) -> Dict[str, Any]:
    """A small UNet2DConditionModel config with SD 1.x's block structure (or
    SDXL's: three levels, no attention at the first, linear projections and
    an added time/text embedding), for fast conformance tests."""
    if sdxl:
        return {
            "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64], "layers_per_block": 2, "norm_num_groups": 8,
            "cross_attention_dim": cross_attention_dim, "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 2, 2], "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * 6 + cross_attention_dim,
        }
    return {
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 4,
    }


def tiny_flux_config(width: int = 64, heads: int = 2) -> Dict[str, Any]:
    """A small FluxTransformer2DModel config (one double and one single block)."""
    return {
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": width // heads, "num_attention_heads": heads,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
        "axes_dims_rope": [width // heads // 4, width // heads * 3 // 8,
                           width // heads * 3 // 8],
    }
