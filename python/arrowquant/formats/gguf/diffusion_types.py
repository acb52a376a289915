"""Per-tensor GGUF types of diffusion models: the rules of stable-diffusion.cpp
and ComfyUI-GGUF (docs/gguf-diffusion.md gives the source of each), the
protected timestep / modulation layers, preset K-mixes and fallbacks, behind
one function, choose_tensor_type, whose decision (type, rule, reason) goes
into the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from ...errors import ConfigurationError
from .presets import BLOCK_SIZE, BPW, COMFY_RULES, PRESETS, Position, mix_type  # noqa: F401

LAYOUTS = ("sdcpp", "comfy")
ALIGNMENT = 32
#: ggml's name limit in stable-diffusion.cpp (GGML_MAX_NAME=128) and
#: ComfyUI-GGUF's converter (MAX_TENSOR_NAME_LENGTH = 127).
MAX_NAME_BYTES = 127
# Block sizes, bits per weight (BLOCK_SIZE, BPW), the presets' base types
# (PRESETS) and their mix rules are llama.cpp's, shared with the LLM files:
# formats/gguf/presets.py.
# ---------------------------------------------------- ComfyUI-GGUF rules
# tools/convert.py (QUANTIZATION_THRESHOLD, REARRANGE_THRESHOLD, keys_hiprec,
# keys_ignore, shape_fix) and tools/lcpp.patch (per-family tensors left
# unquantized, n_dims == 2 only, the K-mix of img_tensor_get_type).

COMFY_SMALL_THRESHOLD = 1024
COMFY_REARRANGE_THRESHOLD = 512
COMFY_SHAPE_FIX = ("sd1", "sdxl")
COMFY_HIPREC: Dict[str, Tuple[str, ...]] = {
    "hidream": (".ff_i.gate.weight", "img_emb.emb_pos"),
    "cosmos": ("pos_embedder",),
    "wan": (".modulation",),
    "hyvid": (),
    "ltxv": ("scale_shift_table",),
}
COMFY_IGNORE: Dict[str, Tuple[str, ...]] = {"cosmos": ("_extra_state", "accum_")}
#: Left at the base file's precision by the patched llama-quantize:
#: (substring, ...) and exact names ("=name").
COMFY_KEEP: Dict[str, Tuple[str, ...]] = {
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "sd1": ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.",
            "conv_in.", "conv_out.", "=input_blocks.0.0.weight", "=out.2.weight"),
    "sd3": ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
            "x_embedder.", "=proj_out.weight", "=pos_embed"),
    "aura": ("t_embedder.", "init_x_linear.", "=modF.1.weight", "=cond_seq_linear.weight",
             "=final_linear.weight", "=positional_encoding", "=register_tokens"),
    "ltxv": ("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.",
             "scale_shift_table"),
    "hyvid": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "wan": ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.",
            "time_embedding.", "img_emb.", "head."),
    "hidream": ("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", ".ff_i.gate.weight",
                "caption_projection."),
    "cosmos": ("p_embedder.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "pos_embedder.",
               "final_layer."),
    "lumina2": ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.",
                "noise_refiner."),
}
COMFY_KEEP["sdxl"] = COMFY_KEEP["sd1"]
COMFY_ATTN_V = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight",
                ".attn.w2v.weight", "_attn.v_proj.weight")
COMFY_QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
COMFY_FFN_DOWN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
                  ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")

# ---------------------------------------------- stable-diffusion.cpp rules
# model.cpp ModelLoader::tensor_should_be_converted: tensors its convert
# never quantizes (kept at the source's float type).
SDCPP_KEEP = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
              "x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "context_embedder.",
              "time_embed.", "label_emb.", "embedding")
#: model.cpp unused_tensors (prefixes): training state in original checkpoints.
SDCPP_UNUSED = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_",
                "model_ema.", "embedding_manager", "denoiser.sigmas", "lora.",
                "cond_stage_model.model.logit_scale", "conditioner.embedders.0.model.logit_scale",
                "conditioner.embedders.1.model.logit_scale", "first_stage_model.bn.")


# ------------------------------------------------------------ type choice


@dataclass(frozen=True)
class TypeDecision:
    """What `choose_tensor_type` decided for one tensor, and why."""

    gguf_type: str
    rule: str
    reason: str
    fallback: bool = False


@dataclass
class MixState:
    """Counters of llama.cpp's mix rules (attention v layers seen so far)."""

    attention_v: int = 0


def _wide(dtype: str) -> str:
    return "F16" if dtype == "float16" else "F32"


def _keep_match(rules: Sequence[str], name: str) -> Optional[str]:
    for r in rules:
        if (r.startswith("=") and name == r[1:]) or (not r.startswith("=") and r in name):
            return r.lstrip("=")
    return None


def _comfy_mix(preset: str, base: str, name: str, mix: MixState) -> Tuple[str, Optional[str]]:
    """img_tensor_get_type of ComfyUI-GGUF's llama.cpp patch: the type of one
    2-D tensor under `preset` (a K-quant preset name or a plain type), from
    presets.COMFY_RULES."""
    if any(p in name for p in COMFY_ATTN_V):
        cat, what = "attn_v", "attention v"
        pos = Position(index=mix.attention_v)
        mix.attention_v += 1
    elif any(p in name for p in COMFY_QKV):
        cat, what, pos = "attn_qkv", "fused qkv", Position()
    elif any(p in name for p in COMFY_FFN_DOWN):
        cat, what, pos = "ffn_down", "feed-forward down projection", Position()
    else:
        return base, None
    t, rule = mix_type(COMFY_RULES, preset, cat, pos)
    return (t, what) if rule else (base, None)


def choose_tensor_type(name: str, shape: Sequence[int], written_shape: Sequence[int], dtype: str,
                       target: str, layout: str, family: str, *, source_names: Sequence[str] = (),
                       mix: Optional[MixState] = None,
                       writable: Sequence[str] = ()) -> TypeDecision:
    """The GGUF type of one tensor. `name` is the output name, `shape` the
    model's (numpy order), `written_shape` the stored one (after a ComfyUI
    orig_shape reshape), `target` a type or a preset name (Q4_K_M ...).
    The first rule that applies decides:

    1. 1-D tensors -> F32 (both runtimes compute with them in float32;
       quantized norm weights are what wrecks images); comfy: also tensors of
       at most 1024 elements, the family's high-precision keys, and tensors
       of more than 4 dimensions (stored flattened with orig_shape);
    2. target F32 / F16 -> that type;
    3. the runtime's never-quantized tensors (sd.cpp's convert rules; the
       ComfyUI patch's per-family list; ComfyUI quantizes 2-D tensors only)
       -> the source's float type (F16 for float16, else F32; comfy: F16);
    4. timestep / adaLN modulation / embedding layers (ArrowQuant's diffusion
       planner patterns) -> Q8_0 when the target is narrower;
    5. the K-mix of ComfyUI-GGUF's patch (attention v, fused qkv, down
       projections one or two types higher): comfy always (as its quantizer),
       sdcpp for preset names (Q4_K_M ...);
    6. a block type whose block does not divide the row (the last dimension)
       -> fallback: comfy F16 (its patch's fallback); sdcpp: for a K type the
       narrowest 32-block type with at least its bits (IQ4_NL / Q8_0), else
       the source's float type (as sd.cpp's convert keeps it);
    then the type chosen."""
    from ...planning.rules import timestep_layer

    numel = math.prod(int(d) for d in shape) if len(shape) else 1
    base = PRESETS.get(target, target)
    if writable and base not in writable:
        raise ConfigurationError(f"GGUF type {target!r} is not available in this build "
                                 f"(writable: {', '.join(writable)})")
    if len(shape) <= 1:
        return TypeDecision("F32", "1d", f"{len(shape)}-D tensor kept in F32")
    if layout == "comfy":
        if numel <= COMFY_SMALL_THRESHOLD:
            return TypeDecision("F32", "comfy-small",
                                f"{numel} elements <= {COMFY_SMALL_THRESHOLD}: F32 (ComfyUI-GGUF)")
        hi = _keep_match(COMFY_HIPREC.get(family, ()), name)
        if hi:
            return TypeDecision("F32", "comfy-hiprec",
                                f"{family} high-precision key {hi!r}: F32 (ComfyUI-GGUF)")
        if len(shape) > 4:
            return TypeDecision("F32", "comfy-nd", f"{len(shape)}-D tensor: F32, stored flattened "
                                "with comfy.gguf.orig_shape (ggml holds 4 dimensions)")
    if base in ("F32", "F16"):
        return TypeDecision(base, "target", f"{base} for every tensor of 2+ dimensions")
    if layout == "comfy":
        keep = _keep_match(COMFY_KEEP.get(family, ()), name)
        if keep:
            return TypeDecision("F16", "comfy-keep",
                                f"{family}: {keep!r} left unquantized by ComfyUI-GGUF's quantizer")
        if len(written_shape) != 2:
            return TypeDecision("F16", "comfy-not-2d", f"{len(written_shape)}-D tensor: ComfyUI-GGUF "
                                "quantizes 2-D tensors only")
    else:
        keep = _keep_match(SDCPP_KEEP, name)
        if keep:
            wide = _wide(dtype)
            return TypeDecision(wide, "sdcpp-keep",
                                f"{keep!r}: never quantized by stable-diffusion.cpp; {wide}")
    chosen, rule, reason = base, "target", f"{base} (target {target})"
    label = None
    for n in (name, *source_names):
        label = timestep_layer(n)
        if label:
            break
    if label and BPW[base] < BPW["Q8_0"]:
        chosen, rule, reason = "Q8_0", "timestep", f"{label} layer: Q8_0 (no narrower than 8 bits)"
    elif layout == "comfy" or target != base:
        # comfy: its quantizer's mix for every target; sdcpp: for preset names only
        mixed, why = _comfy_mix(target, base, name, mix if mix is not None else MixState())
        if why:
            chosen, rule, reason = mixed, "comfy-mix", f"{why}: {mixed} under {target} (ComfyUI-GGUF)"
    if writable and chosen not in writable:
        chosen, reason = base, reason + f"; {chosen} unavailable, {base}"
    block = BLOCK_SIZE.get(chosen)
    row = int(written_shape[-1])
    if block and row % block:
        alt = None if layout == "comfy" else _narrow_fallback(chosen, row, writable)
        if alt:
            return TypeDecision(alt, "fallback", f"row length {row} is not a multiple of {block}: "
                                f"{chosen} impossible, {alt} (the narrowest type of at least "
                                f"{BPW[chosen]:g} bits whose block divides the row)", True)
        wide = "F16" if layout == "comfy" else _wide(dtype)
        return TypeDecision(wide, "fallback", f"row length {row} is not a multiple of {block}: "
                            f"{chosen} impossible, {wide}", True)
    return TypeDecision(chosen, rule, reason)


def _narrow_fallback(chosen: str, row: int, writable: Sequence[str]) -> Optional[str]:
    """sdcpp: for a super-block type (256) on a row of a multiple of 32, the
    narrowest 32-block type with at least as many bits per weight (a non-
    uniform IQ4_NL before Q4_0 at the same bits); None when there is none."""
    if BLOCK_SIZE.get(chosen) != 256:
        return None
    cands = [t for t in ("IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
             if (not writable or t in writable) and row % BLOCK_SIZE[t] == 0
             and BPW[t] >= BPW[chosen]]
    return min(cands, key=lambda t: BPW[t]) if cands else None


#: How each component's blocks are chosen: ArrowQuant's error-minimizing
#: search, except the text encoder, whose blocks are plainly rounded
#: (llama.cpp's reference bytes). Measured (docs/gguf-diffusion.md, "The text
#: encoder decides it"): on the SD 1.5-size pipeline, three prompts, rounding
#: the CLIP text encoder lifts render PSNR vs F16 from 48.05 to 50.15 dB at
#: Q8_0, 29.49 to 30.77 at Q4_0 and 30.59 to 31.77 at Q4_K, above
#: stable-diffusion.cpp's own files (50.05 / 29.85 / 30.61).
DEFAULT_BLOCK_MODE = {"text_encoder": "reference", "*": "search"}
