"""Diffusion models as GGUF files that the diffusion runtimes read.

Two layouts (docs/gguf-diffusion.md has each rule and the file it comes from):

* ``sdcpp`` -- stable-diffusion.cpp. SD 1.x / 2.x and SDXL: UNet, VAE and
  text encoder(s) in one file under the names sd.cpp's loader converts every
  input to (``model.diffusion_model.`` + LDM UNet names, ``first_stage_model.``
  + LDM VAE names, ``cond_stage_model.transformer.`` (+ ``cond_stage_model.1.
  transformer.`` for SDXL's second encoder) + Hugging Face CLIP names). FLUX:
  the transformer alone (sd.cpp's ``--diffusion-model``), reference names
  under ``model.diffusion_model.``. No ``general.architecture`` (sd.cpp's own
  files have none; it detects the version from tensor names).
* ``comfy`` -- ComfyUI-GGUF's UNet loader: the diffusion model alone, with
  reference names and the ``model.diffusion_model.`` / ``model.`` / ``net.``
  prefix stripped, ``general.architecture`` = the family (flux, sd3, sdxl,
  sd1, aura, hidream, cosmos, ltxv, hyvid, wan, lumina2), its F32 rules, and
  for sd1 / sdxl the convolution weights whose last dimension is not a
  multiple of 256 stored as (n/256, 256) with ``comfy.gguf.orig_shape.<name>``.

Input: a diffusers pipeline directory (model_index.json + unet/ vae/
text_encoder/ [text_encoder_2/] or transformer/), one component directory
(config.json + SafeTensors), or a single-file checkpoint with original names
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)
or reference names (FLUX ``double_blocks.*`` ...). Diffusers names are
converted to original ones (diffusion_names.py).

Streaming: tensors are read in row chunks (SafeTensors pread into one
buffer), fused / reordered / reshaped on the fly, and handed to the C++ GGUF
writer (arrowquant._core.GgufWriter), which quantizes and writes them in
order. No state dict is ever built: the buffer of one chunk (a quarter of
``max_memory``), the writer's own chunk buffers and the component being read
are all that is resident.

Every per-tensor type comes from one function, `choose_tensor_type`, whose
decision (type, rule, reason) is in the report; the planner's measured
choices can be put behind it later.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import ArrowQuantError, ConfigurationError, MetadataError, ModelNotFoundError
from .diffusion_names import (COMFY_ARCHITECTURES, Mapped, Part, clip_to_prefixed,
                              detect_reference_family, flux_to_original, strip_reference_prefix,
                              unet_to_original, vae_to_original)

PathLike = Union[str, "os.PathLike[str]"]

LAYOUTS = ("sdcpp", "comfy")
ALIGNMENT = 32
#: ggml's name limit in stable-diffusion.cpp (GGML_MAX_NAME=128) and
#: ComfyUI-GGUF's converter (MAX_TENSOR_NAME_LENGTH = 127).
MAX_NAME_BYTES = 127
#: Elements per block of each block type (the row length must be a multiple).
BLOCK_SIZE = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32,
              "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
#: Bits per weight of each type (block bytes * 8 / block size), for ordering.
BPW = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K": 5.5,
       "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
       "Q3_K": 3.4375, "Q2_K": 2.625}
#: llama.cpp's K-quant presets: the base type of each (llama_model_quantize).
PRESETS = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
           "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
           "Q6_K": "Q6_K"}

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
    2-D tensor under `preset` (a K-quant preset name or a plain type)."""
    if any(p in name for p in COMFY_ATTN_V):
        i = mix.attention_v
        mix.attention_v += 1
        up = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
              "Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K"}.get(preset)
        if preset == "Q4_K_S" and i < 4:
            up = "Q5_K"
        return (up, "attention v") if up else (base, None)
    if any(p in name for p in COMFY_QKV):
        up = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(preset)
        return (up, "fused qkv") if up else (base, None)
    if any(p in name for p in COMFY_FFN_DOWN):
        up = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "Q4_K_S": "Q5_K", "Q4_K_M": "Q6_K",
              "Q5_K_M": "Q6_K", "Q4_0": "Q4_1", "Q5_0": "Q5_1"}.get(preset)
        return (up, "feed-forward down projection") if up else (base, None)
    return base, None


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
    from ...diffusion import timestep_layer

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


# ----------------------------------------------------------------- inputs


@dataclass
class Component:
    """One source of tensors: a diffusers component or a single file."""

    kind: str  # unet, vae, text_encoder, text_encoder_2, transformer, checkpoint
    path: Path
    config: Dict[str, Any] = field(default_factory=dict)
    source: Any = None

    def open(self) -> Any:
        if self.source is None:
            from ...sources import open_model

            self.source = open_model(self.path)
        return self.source

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None


@dataclass
class OutTensor:
    """One tensor of the output file, before its type is chosen."""

    name: str
    parts: Tuple[Part, ...]
    shape: Tuple[int, ...]
    component: Component
    dtype: str
    source_names: List[str]


def _read_json(p: Path) -> Dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{p}: cannot read JSON ({exc})") from None


_KIND_BY_CLASS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae",
                  "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder",
                  "FluxTransformer2DModel": "transformer"}


def find_components(path: PathLike) -> Tuple[List[Component], str]:
    """The components of a diffusion input and its kind ("pipeline",
    "component", "single-file")."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if not p.name.endswith(".safetensors"):
            raise MetadataError(f"{p}: a single-file diffusion checkpoint must be .safetensors")
        return [Component("checkpoint", p)], "single-file"
    if (p / "model_index.json").exists():
        comps = []
        for kind in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
            d = p / kind
            if d.is_dir() and (d / "config.json").exists():
                comps.append(Component(kind, d, _read_json(d / "config.json")))
        if not any(c.kind in ("unet", "transformer") for c in comps):
            raise ModelNotFoundError(f"{p}: pipeline has no unet/ or transformer/ component")
        return comps, "pipeline"
    cfg_path = p / "config.json"
    if cfg_path.exists():
        cfg = _read_json(cfg_path)
        cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        kind = _KIND_BY_CLASS.get(str(cls))
        if kind is None:
            raise MetadataError(f"{cfg_path}: {cls!r} is not a diffusion component this converter "
                                f"knows ({', '.join(sorted(_KIND_BY_CLASS))})")
        return [Component(kind, p, cfg)], "component"
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return [Component("checkpoint", files[0])], "single-file"
    raise ModelNotFoundError(f"{p}: neither a diffusers pipeline (model_index.json), a component "
                             "(config.json) nor one .safetensors checkpoint")


def _unet_family(cfg: Dict[str, Any]) -> str:
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd1"


def _mapped_to_out(mapped: List[Mapped], comp: Component, prefix: str) -> List[OutTensor]:
    src = comp.open()
    out = []
    for m in mapped:
        dtypes = {src.info(part.source).dtype for part in m.parts}
        if len(dtypes) != 1:
            raise MetadataError(f"{comp.path}: {m.name!r} fuses tensors of different dtypes "
                                f"{sorted(dtypes)}")
        out.append(OutTensor(prefix + m.name, m.parts, m.shape, comp, dtypes.pop(), m.sources))
    return out


def _float_shapes(comp: Component) -> Tuple[Dict[str, Tuple[int, ...]], List[Dict[str, str]]]:
    from ...tensor import QUANTIZABLE_DTYPES

    src = comp.open()
    shapes, skipped = {}, []
    for t in src.tensors:
        if t.dtype not in QUANTIZABLE_DTYPES:
            skipped.append({"name": t.name, "reason": f"dtype {t.dtype} is not floating point"})
        elif t.numel == 0:
            skipped.append({"name": t.name, "reason": "empty tensor"})
        else:
            shapes[t.name] = tuple(int(d) for d in t.shape)
    return shapes, skipped


def plan_tensors(components: List[Component], layout: str
                 ) -> Tuple[List[OutTensor], str, List[Dict[str, str]], List[str]]:
    """(output tensors in file order, family, skipped, notes) for `layout`."""
    if layout not in LAYOUTS:
        raise ConfigurationError(f"GGUF layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out: List[OutTensor] = []
    skipped: List[Dict[str, str]] = []
    notes: List[str] = []
    family: Optional[str] = None
    kinds = {c.kind for c in components}
    for comp in components:
        shapes, sk = _float_shapes(comp)
        skipped += [dict(s, component=comp.kind) for s in sk]
        if comp.kind == "unet":
            family = _unet_family(comp.config)
            pfx = "model.diffusion_model." if layout == "sdcpp" else ""
            out += _mapped_to_out(unet_to_original(shapes, comp.config), comp, pfx)
        elif comp.kind == "transformer":
            cls = comp.config.get("_class_name")
            if cls != "FluxTransformer2DModel":
                raise MetadataError(f"{comp.path}: diffusers {cls!r} -> reference names is not "
                                    "implemented (FLUX only); give a reference single-file checkpoint")
            family = "flux"
            pfx = "model.diffusion_model." if layout == "sdcpp" else ""
            out += _mapped_to_out(flux_to_original(shapes), comp, pfx)
        elif comp.kind == "checkpoint":
            out_c, fam, sk2 = _plan_checkpoint(comp, shapes, layout)
            family = family or fam
            out += out_c
            skipped += sk2
        elif layout == "comfy" or (family == "flux" or "transformer" in kinds):
            notes.append(f"{comp.kind}/ not written: " + (
                "ComfyUI-GGUF's UNet loader reads the diffusion model only" if layout == "comfy"
                else "stable-diffusion.cpp reads FLUX's VAE and text encoders from separate files"))
            comp.close()
        elif comp.kind == "vae":
            out += _mapped_to_out(vae_to_original(shapes, comp.config), comp, "first_stage_model.")
        elif comp.kind in ("text_encoder", "text_encoder_2"):
            pfx = "cond_stage_model.transformer." if comp.kind == "text_encoder" \
                else "cond_stage_model.1.transformer."
            out += _mapped_to_out(clip_to_prefixed(shapes, pfx), comp, "")
    if family is None:
        raise MetadataError("no diffusion model found in the input")
    seen: Dict[str, OutTensor] = {}
    for t in out:
        if t.name in seen:
            raise MetadataError(f"two source tensors map to {t.name!r}: {seen[t.name].source_names} "
                                f"and {t.source_names}")
        if len(t.name.encode()) > MAX_NAME_BYTES:
            raise MetadataError(f"tensor name {t.name!r} is longer than {MAX_NAME_BYTES} bytes "
                                "(the runtimes' limit)")
        seen[t.name] = t
    return out, family, skipped, notes


def _first_dim(shape: Sequence[int]) -> int:
    """Part counts: rows of the first dimension (elements of a 1-D tensor)."""
    return int(shape[0]) if len(shape) else 1


def _plan_checkpoint(comp: Component, shapes: Dict[str, Tuple[int, ...]], layout: str
                     ) -> Tuple[List[OutTensor], str, List[Dict[str, str]]]:
    """A single .safetensors file: original (prefixed) names, reference names
    without prefix, or a diffusers UNet / FLUX transformer file."""
    names = list(shapes)
    prefix, kept = strip_reference_prefix(names)
    stripped = [n[len(prefix):] for n in kept]
    family, diffusers_layout = detect_reference_family(stripped)
    skipped: List[Dict[str, str]] = []
    if family is None:
        raise MetadataError(f"{comp.path}: unknown diffusion architecture (none of ComfyUI-GGUF's "
                            f"detection keys for {', '.join(COMFY_ARCHITECTURES)} found)")
    if diffusers_layout:
        if family == "flux":
            mapped = flux_to_original({n: shapes[n] for n in kept})
        elif family in ("sd1", "sdxl"):
            cfg_path = comp.path.parent / "config.json"
            if not cfg_path.exists():
                raise MetadataError(f"{comp.path}: a diffusers-named UNet file needs its "
                                    "config.json beside it to number the blocks")
            mapped = unet_to_original({n: shapes[n] for n in kept}, _read_json(cfg_path))
        else:
            raise MetadataError(f"{comp.path}: diffusers-named {family} weights: convert to the "
                                "reference checkpoint names first (only FLUX and UNets are mapped here)")
        pfx = "model.diffusion_model." if layout == "sdcpp" else ""
        return _mapped_to_out(mapped, comp, pfx), family, skipped
    out: List[OutTensor] = []
    src = comp.open()
    if layout == "comfy":
        ignore = COMFY_IGNORE.get(family, ())
        for n in kept:
            if any(s in n for s in ignore):
                skipped.append({"name": n, "reason": f"{family}: ignored key (ComfyUI-GGUF)"})
                continue
            t = src.info(n)
            out.append(OutTensor(n[len(prefix):], (Part(n, 0, _first_dim(shapes[n])),), shapes[n], comp, t.dtype, [n]))
        for n in names:
            if n not in kept:
                skipped.append({"name": n, "reason": f"outside {prefix!r}: not part of the "
                                "diffusion model (ComfyUI-GGUF's UNet loader)"})
        return out, family, skipped
    # sdcpp: original single-file names are already the names sd.cpp's loader
    # converts to; reference files without a prefix get model.diffusion_model.
    add = "model.diffusion_model." if prefix == "" else ""
    for n in names:
        if any(n.startswith(u) for u in SDCPP_UNUSED):
            skipped.append({"name": n, "reason": "unused by stable-diffusion.cpp (training state)"})
            continue
        t = src.info(n)
        if len(t.shape) > 4:
            raise MetadataError(f"{comp.path}: tensor {n!r} has {len(t.shape)} dimensions; the "
                                "sdcpp layout (ggml) holds 4")
        out.append(OutTensor(add + n, (Part(n, 0, _first_dim(shapes[n])),), shapes[n], comp, t.dtype, [n]))
    return out, family, skipped


# ----------------------------------------------------------------- writer


def comfy_shape_fix(family: str, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """ComfyUI-GGUF's rearrangement (convert.py, shape_fix families sd1 /
    sdxl): a tensor of 2+ dimensions with at least 512 elements, a multiple of
    256 in all, whose last dimension is not a multiple of 256, is stored as
    (n/256, 256)."""
    if family not in COMFY_SHAPE_FIX or len(shape) < 2:
        return None
    n = math.prod(int(d) for d in shape)
    if n >= COMFY_REARRANGE_THRESHOLD and n % 256 == 0 and int(shape[-1]) % 256:
        return (n // 256, 256)
    return None


def _written_shape(t: OutTensor, layout: str, family: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    if layout == "comfy":
        fix = comfy_shape_fix(family, t.shape)
        if fix:
            return fix, "rearranged to (n/256, 256), comfy.gguf.orig_shape records the shape"
        if len(t.shape) > 4:
            return (math.prod(t.shape[:-1]), t.shape[-1]), \
                f"{len(t.shape)}-D: flattened, comfy.gguf.orig_shape records the shape"
    return tuple(t.shape), None


def _writable_types() -> Tuple[str, ...]:
    from ... import gguf_export

    return tuple(gguf_export.GGUF_TYPES)


def export_diffusion_gguf(source: PathLike, out_path: PathLike, *, gguf_type: str = "Q8_0",
                          layout: str = "sdcpp", threads: int = 0, max_memory: Union[int, str] = "256MiB",
                          overwrite: bool = False, progress: Any = None,
                          name: Optional[str] = None, chunk_bytes: Optional[int] = None,
                          block_mode: Union[str, Dict[str, str]] = "search",
                          type_override: Optional[Callable[[OutTensor, TypeDecision], TypeDecision]] = None,
                          ) -> Dict[str, Any]:
    """Writes the diffusion model at `source` as one GGUF file in `layout`
    ("sdcpp" or "comfy"); returns the report (per tensor: type, rule, reason,
    error). `gguf_type` is a type (F32, F16, Q8_0, Q4_0, Q4_1, and the K types
    when the writer has them) or a llama.cpp preset name (Q4_K_M ...).
    `max_memory` bounds the read buffer (a quarter of it per chunk, at least
    1 MiB; `chunk_bytes` sets the chunk directly).
    `block_mode` "search" (ArrowQuant's error-minimizing block search) or
    "reference" (plain rounding: llama.cpp's reference bytes for Q8_0 / Q4_0 /
    Q4_1), or a dict by component kind ({"text_encoder": "reference"}; others
    search). `type_override(tensor, decision)` may replace a decision (the hook for
    measured per-tensor choices); its result is re-checked against the row
    length."""
    from ... import _core
    from ...units import parse_size

    t0 = time.perf_counter()
    target = str(gguf_type).upper()
    writable = _writable_types()
    if PRESETS.get(target, target) not in writable and target not in ("F16", "F32"):
        raise ConfigurationError(f"GGUF type {gguf_type!r} is not available (writable types: "
                                 f"{', '.join(writable)}; presets {', '.join(PRESETS)} need the K types)")
    out = Path(out_path)
    if out.is_dir():
        raise ArrowQuantError(f"{out}: is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        raise ArrowQuantError(f"{out.parent}: output directory does not exist")
    budget = parse_size(max_memory, "max_memory") if not isinstance(max_memory, int) else max_memory
    if chunk_bytes is None:
        chunk_bytes = max(1 << 20, budget // 4)
    elif chunk_bytes <= 0:
        raise ConfigurationError(f"chunk_bytes must be positive, got {chunk_bytes}")

    components, input_kind = find_components(source)
    try:
        tensors, family, skipped, notes = plan_tensors(components, layout)
        mix = MixState()
        plan = []
        metadata: List[Tuple[str, str, Any]] = []
        for t in tensors:
            wshape, note = _written_shape(t, layout, family)
            d = choose_tensor_type(t.name, t.shape, wshape, t.dtype, target, layout, family,
                                   source_names=t.source_names, mix=mix, writable=writable)
            if type_override is not None:
                d = type_override(t, d)
                blk = BLOCK_SIZE.get(d.gguf_type)
                if blk and int(wshape[-1]) % blk:
                    raise ConfigurationError(f"{t.name}: override {d.gguf_type} impossible, row "
                                             f"length {wshape[-1]} not a multiple of {blk}")
            if note:
                metadata.append((f"comfy.gguf.orig_shape.{t.name}", "array[int32]",
                                 [int(x) for x in t.shape]))
            plan.append((t, wshape, d, note))
        main = PRESETS.get(target, target)
        md: List[Tuple[str, str, Any]] = []
        if layout == "comfy":
            md.append(("general.architecture", "string", family))
        md += [
            ("general.name", "string", name or Path(source).name),
            ("general.alignment", "uint32", ALIGNMENT),
            ("general.quantization_version", "uint32", 2),
            ("general.file_type", "uint32", int(_core.gguf_file_type(main))),
            ("arrowquant.version", "string", _version()),
            ("arrowquant.layout", "string", layout),
            ("arrowquant.family", "string", family),
            ("arrowquant.gguf_type", "string", target),
        ]
        md += metadata
        specs = [(t.name, list(ws), d.gguf_type) for t, ws, d, _ in plan]
        modes = block_mode if isinstance(block_mode, dict) else {"*": block_mode}
        if any(m not in ("search", "reference") for m in modes.values()):
            raise ConfigurationError(f"block_mode must be 'search' or 'reference', got {block_mode!r}")
        md.append(("arrowquant.block_mode", "string",
                   block_mode if isinstance(block_mode, str) else json.dumps(block_mode, sort_keys=True)))
        records = _write(out, md, specs, plan, chunk_bytes, threads, progress, block_mode)
    finally:
        for c in components:
            c.close()
    types: Dict[str, int] = {}
    for r in records:
        types[r["gguf_type"]] = types.get(r["gguf_type"], 0) + 1
    out_bytes = out.stat().st_size
    in_bytes = sum(r["input_bytes"] for r in records)
    return {
        "output": str(out), "source": str(source), "input_kind": input_kind,
        "components": [c.kind for c in components], "layout": layout, "family": family,
        "architecture": family if layout == "comfy" else None, "gguf_type": target,
        "output_format": "gguf", "gguf_version": 3, "tensors": len(records), "types": types,
        "fallbacks": [r["name"] for r in records if r["fallback"]],
        "orig_shape_keys": [r["name"] for r in records if r["orig_shape"]],
        "skipped": skipped, "notes": notes, "input_bytes": in_bytes, "output_bytes": out_bytes,
        "params": sum(math.prod(r["shape"]) for r in records),
        "chunk_bytes": chunk_bytes, "max_memory": budget,
        "seconds": time.perf_counter() - t0, "tensors_detail": records,
    }


def _write(out: Path, md: List[Tuple[str, str, Any]], specs: List[Tuple[str, List[int], str]],
           plan: List[Tuple[OutTensor, Tuple[int, ...], TypeDecision, Optional[str]]],
           chunk_bytes: int, threads: int, progress: Any,
           block_mode: Union[str, Dict[str, str]] = "search") -> List[Dict[str, Any]]:
    from ... import _core
    from ...gguf_export import _progress, _type_bytes
    from ...sources import itemsize
    from ...tensor import ErrorSums

    total = sum(math.prod(t.shape) * itemsize(t.dtype) for t, _, _, _ in plan)
    report_progress = _progress(progress, max(total, 1))
    writer = _core.GgufWriter(str(out), md, specs, ALIGNMENT)
    records: List[Dict[str, Any]] = []
    buf: Optional[np.ndarray] = None
    done = 0
    try:
        for t, wshape, d, note in plan:
            t_start = time.perf_counter()
            src = t.component.open()
            isz = itemsize(t.dtype)
            numel = math.prod(t.shape)
            # The writer takes whole rows of the written shape (first dimension).
            wcols = numel // int(wshape[0]) if len(wshape) >= 2 else numel
            mode = block_mode if isinstance(block_mode, str) else \
                block_mode.get(t.component.kind, block_mode.get("*", "search"))
            if mode != "search" and d.gguf_type in BLOCK_SIZE:
                writer.set_tensor_options(mode)
            sums = ErrorSums()
            carry = np.empty(0, dtype=np.uint8)
            chunks = 0
            for part in t.parts:
                info = src.info(part.source)
                if len(info.shape) <= 1:
                    # 1-D: the part counts elements; the reader's view is one row.
                    raw = src.read(part.source, 0, 1)
                    data = raw[part.row_start * isz:(part.row_start + part.row_count) * isz]
                    carry = np.concatenate([carry, data]) if carry.size else data.copy()
                    done += data.size
                    continue
                row_bytes = max(1, info.nbytes // max(info.rows, 1))
                per = max(1, min(part.row_count, chunk_bytes // row_bytes))
                need = per * row_bytes
                if buf is None or buf.size < need:
                    buf = None
                    buf = np.empty(need, dtype=np.uint8)
                for r0 in range(part.row_start, part.row_start + part.row_count, per):
                    n = min(per, part.row_start + part.row_count - r0)
                    raw = src.read(part.source, r0, n, out=buf[: n * row_bytes])
                    data = np.concatenate([carry, raw]) if carry.size else raw
                    elems = data.size // isz
                    whole = elems // wcols * wcols
                    if whole:
                        s = writer.append_rows(np.ascontiguousarray(data[: whole * isz]), t.dtype,
                                               whole // wcols, wcols, threads)
                        sums.merge(ErrorSums(*s))
                        chunks += 1
                    carry = data[whole * isz:].copy()
                    done += n * row_bytes
                    if report_progress is not None:
                        report_progress(t.name, done / max(total, 1))
            if carry.size and (carry.size // isz) % wcols == 0:
                s = writer.append_rows(np.ascontiguousarray(carry), t.dtype,
                                       carry.size // isz // wcols, wcols, threads)
                sums.merge(ErrorSums(*s))
                chunks += 1
                carry = carry[:0]
            if carry.size:
                raise MetadataError(f"{t.name}: {carry.size // isz} elements left over after "
                                    f"rows of {wcols} (shape {t.shape})")
            m = sums.metrics()
            records.append({
                "name": t.name, "sources": t.source_names, "component": t.component.kind,
                "shape": list(t.shape), "gguf_dims": list(reversed(wshape)),
                "orig_shape": note is not None, "source_dtype": t.dtype,
                "gguf_type": d.gguf_type, "rule": d.rule, "reason": d.reason + (f"; {note}" if note else ""),
                "fallback": d.fallback, "input_bytes": numel * isz,
                "output_bytes": _type_bytes_any(d.gguf_type, numel),
                "chunks": chunks, "cosine": m.cosine, "rel_mse": m.rel_mse,
                "sqnr_db": m.sqnr_db if math.isfinite(m.sqnr_db) else None,
                "max_abs_error": m.max_abs_error, "seconds": time.perf_counter() - t_start,
            })
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return records


#: Bytes per block of each block type.
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "IQ4_NL": 18,
               "Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "IQ4_XS": 136}


def _type_bytes_any(gtype: str, numel: int) -> int:
    if gtype in BLOCK_BYTES:
        return numel // BLOCK_SIZE[gtype] * BLOCK_BYTES[gtype]
    return numel * {"F32": 4, "F16": 2}[gtype]


def _version() -> str:
    from ... import __version__

    return __version__


def format_report(report: Dict[str, Any], verbose: bool = False) -> str:
    """Human-readable summary of an export_diffusion_gguf report."""
    from ...units import format_size

    lines = []
    if verbose:
        for r in report["tensors_detail"]:
            shape = "x".join(str(d) for d in r["shape"])
            sq = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
            lines.append(f"  {r['name']:<72} {shape:<16} {r['gguf_type']:<5} {sq:>9}  "
                         f"{r['rule']}: {r['reason']}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items()))
    arch = report["architecture"] or "(none: sd.cpp detects the version from names)"
    lines.append(f"wrote {report['output']}: GGUF v3, {report['layout']} layout, family "
                 f"{report['family']}, general.architecture {arch}, {report['tensors']} tensors "
                 f"({types}) in {report['seconds']:.2f} s")
    lines.append(f"  {format_size(report['input_bytes'])} -> {format_size(report['output_bytes'])}")
    rules: Dict[str, int] = {}
    for r in report["tensors_detail"]:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    lines.append("  decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
    if report["orig_shape_keys"]:
        lines.append(f"  {len(report['orig_shape_keys'])} tensor(s) rearranged with "
                     "comfy.gguf.orig_shape")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])}: " +
                     ", ".join(s["name"] for s in report["skipped"][:6]) +
                     (" ..." if len(report["skipped"]) > 6 else ""))
    return "\n".join(lines)


def is_diffusion_input(path: PathLike) -> bool:
    """True for a diffusers pipeline / diffusion component directory or a
    single-file diffusion checkpoint (the CLI routes those here)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").exists():
            return True
        cfg = p / "config.json"
        if cfg.exists():
            try:
                c = json.loads(cfg.read_text())
            except (OSError, ValueError):
                return False
            return str(c.get("_class_name")) in _KIND_BY_CLASS and c.get("_class_name") != "CLIPTextModel"
    return False
