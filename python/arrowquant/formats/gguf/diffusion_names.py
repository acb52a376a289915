"""Diffusers -> original ("reference") tensor names for diffusion models, and
the architecture of a reference state dict.

The diffusion runtimes that read GGUF (stable-diffusion.cpp, ComfyUI-GGUF)
use the names of the original checkpoints (CompVis / Stability LDM UNet and
VAE, Black Forest Labs FLUX), not diffusers'. The correspondences are those of
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py and of its single-file loader
(loaders/single_file_utils.py, convert_flux_transformer_checkpoint_to_diffusers),
derived here from the component's config instead of fixed loops, so other
block counts map too. Every tensor of the source must map: a name this module
does not know is an error that names it, never a silent pass-through.

A mapping is a list of `Mapped` entries: the output name, the source rows it
is made of (in order: FLUX fuses q, k, v into one qkv matrix, and its final
adaLN modulation stores shift before scale where diffusers has scale first),
and the output shape in numpy order (the VAE's attention projections are
Linear [C, C] in diffusers and 1x1 Conv [C, C, 1, 1] in the original).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ...errors import MetadataError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """Rows [row_start, row_start + row_count) of source tensor `source`'s
    2-D view (first dimension = rows)."""

    source: str
    row_start: int
    row_count: int


@dataclass(frozen=True)
class Mapped:
    """One output tensor: its name, the source rows it is made of, its shape."""

    name: str
    parts: Tuple[Part, ...]
    shape: Shape

    @property
    def sources(self) -> List[str]:
        out: List[str] = []
        for p in self.parts:
            if p.source not in out:
                out.append(p.source)
        return out


def _whole(name: str, shape: Shape, out_name: str, out_shape: Optional[Shape] = None) -> Mapped:
    rows = int(shape[0]) if len(shape) else 1
    return Mapped(out_name, (Part(name, 0, rows),), tuple(out_shape or shape))


def _unmapped(component: str, name: str) -> MetadataError:
    return MetadataError(f"{component}: tensor {name!r} has no original-checkpoint name "
                         "(an architecture variant this converter does not know)")


# ------------------------------------------------------------------ UNet

_RESNET_INNER = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
                 ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
                 ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))


def unet_prefix_map(config: Mapping[str, object]) -> List[Tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is_resnet) for a UNet2DConditionModel
    config: the LDM numbering of input_blocks / middle_block / output_blocks."""
    down = list(config.get("down_block_types") or ())
    up = list(config.get("up_block_types") or ())
    L = config.get("layers_per_block", 2)
    if not down or not up or not isinstance(L, int) or len(down) != len(up):
        raise MetadataError(f"UNet config: cannot number blocks from down_block_types={down!r}, "
                            f"up_block_types={up!r}, layers_per_block={L!r}")
    n = len(down)
    m: List[Tuple[str, str, bool]] = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    for i, kind in enumerate(down):
        attn = "CrossAttn" in str(kind)
        for j in range(L):
            k = 1 + i * (L + 1) + j
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            if attn:
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op.",
                      False))
    for i, kind in enumerate(up):
        attn = "CrossAttn" in str(kind)
        for j in range(L + 1):
            k = i * (L + 1) + j
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            if attn:
                m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
        if i < n - 1:
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.",
                      False))
    return m


def unet_to_original(shapes: Mapping[str, Shape], config: Mapping[str, object]) -> List[Mapped]:
    """Diffusers UNet2DConditionModel names -> LDM names (no prefix)."""
    pmap = unet_prefix_map(config)
    out = []
    for name, shape in shapes.items():
        for dp, op, resnet in pmap:
            if name.startswith(dp):
                rest = name[len(dp):]
                if resnet:
                    for a, b in _RESNET_INNER:
                        if rest.startswith(a):
                            rest = b + rest[len(a):]
                            break
                out.append(_whole(name, shape, op + rest))
                break
        else:
            raise _unmapped("unet", name)
    return out


# ------------------------------------------------------------------- VAE

_VAE_ATTN_INNER = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                   ("to_out.0.", "proj_out."), ("query.", "q."), ("key.", "k."), ("value.", "v."),
                   ("proj_attn.", "proj_out."))


def vae_to_original(shapes: Mapping[str, Shape], config: Mapping[str, object]) -> List[Mapped]:
    """Diffusers AutoencoderKL names -> LDM first-stage names (no prefix).
    Mid-block attention projections become 1x1 convolutions [C, C, 1, 1]."""
    n = len(config.get("block_out_channels") or (128, 256, 512, 512))
    L = int(config.get("layers_per_block", 2))  # type: ignore[arg-type]
    pm: List[Tuple[str, str, str]] = [  # (diffusers prefix, original prefix, kind)
        ("encoder.conv_in.", "encoder.conv_in.", ""), ("encoder.conv_out.", "encoder.conv_out.", ""),
        ("encoder.conv_norm_out.", "encoder.norm_out.", ""),
        ("decoder.conv_in.", "decoder.conv_in.", ""), ("decoder.conv_out.", "decoder.conv_out.", ""),
        ("decoder.conv_norm_out.", "decoder.norm_out.", ""),
        ("quant_conv.", "quant_conv.", ""), ("post_quant_conv.", "post_quant_conv.", ""),
    ]
    for part in ("encoder", "decoder"):
        for k in range(2):
            pm.append((f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", "resnet"))
        pm.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attn"))
    for i in range(n):
        for j in range(L):
            pm.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "resnet"))
        pm.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ""))
        for j in range(L + 1):
            pm.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.",
                       "resnet"))
        pm.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", ""))
    out = []
    for name, shape in shapes.items():
        for dp, op, kind in pm:
            if not name.startswith(dp):
                continue
            rest = name[len(dp):]
            new_shape = tuple(shape)
            if kind == "resnet" and rest.startswith("conv_shortcut."):
                rest = "nin_shortcut." + rest[len("conv_shortcut."):]
            elif kind == "attn":
                for a, b in _VAE_ATTN_INNER:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                else:
                    raise _unmapped("vae", name)
                if rest.endswith(".weight") and len(shape) == 2 and not rest.startswith("norm."):
                    new_shape = (int(shape[0]), int(shape[1]), 1, 1)
            out.append(_whole(name, shape, op + rest, new_shape))
            break
        else:
            raise _unmapped("vae", name)
    return out


# ----------------------------------------------------------------- CLIP


def clip_to_prefixed(shapes: Mapping[str, Shape], prefix: str) -> List[Mapped]:
    """transformers CLIPTextModel(WithProjection) names under `prefix`
    (stable-diffusion.cpp keeps Hugging Face's CLIP names: for SD 1.x
    cond_stage_model.transformer.text_model.*). text_projection.weight is
    stored as text_model.text_projection (sd.cpp's name for it)."""
    out = []
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            continue
        if name == "text_projection.weight":
            out.append(_whole(name, shape, prefix + "text_model.text_projection"))
        elif name.startswith("text_model."):
            out.append(_whole(name, shape, prefix + name))
        elif name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            # transformers 5 saves CLIPTextModel without the text_model. level
            out.append(_whole(name, shape, prefix + "text_model." + name))
        else:
            raise _unmapped("text_encoder", name)
    return out


# ----------------------------------------------------------------- FLUX

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
}
#: (diffusers suffix within a double block, original suffix, position in a fused tensor)
_FLUX_DOUBLE = (
    ("norm1.linear.", "img_mod.lin.", None), ("norm1_context.linear.", "txt_mod.lin.", None),
    ("attn.to_q.", "img_attn.qkv.", 0), ("attn.to_k.", "img_attn.qkv.", 1),
    ("attn.to_v.", "img_attn.qkv.", 2),
    ("attn.add_q_proj.", "txt_attn.qkv.", 0), ("attn.add_k_proj.", "txt_attn.qkv.", 1),
    ("attn.add_v_proj.", "txt_attn.qkv.", 2),
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale", None),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale", None),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale", None),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale", None),
    ("ff.net.0.proj.", "img_mlp.0.", None), ("ff.net.2.", "img_mlp.2.", None),
    ("ff_context.net.0.proj.", "txt_mlp.0.", None), ("ff_context.net.2.", "txt_mlp.2.", None),
    ("attn.to_out.0.", "img_attn.proj.", None), ("attn.to_add_out.", "txt_attn.proj.", None),
)
_FLUX_SINGLE = (
    ("norm.linear.", "modulation.lin.", None),
    ("attn.to_q.", "linear1.", 0), ("attn.to_k.", "linear1.", 1), ("attn.to_v.", "linear1.", 2),
    ("proj_mlp.", "linear1.", 3),
    ("attn.norm_q.weight", "norm.query_norm.scale", None),
    ("attn.norm_k.weight", "norm.key_norm.scale", None),
    ("proj_out.", "linear2.", None),
)
_BLOCK_RX = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$")


def flux_to_original(shapes: Mapping[str, Shape]) -> List[Mapped]:
    """Diffusers FluxTransformer2DModel names -> Black Forest Labs reference
    names (no prefix): q/k/v fused into qkv (double blocks) and q/k/v/mlp into
    linear1 (single blocks), in that row order; norm_out.linear's two halves
    (diffusers: scale, shift) swapped into final_layer.adaLN_modulation.1
    (reference: shift, scale)."""
    fused: Dict[str, List[Tuple[int, str]]] = {}
    out: List[Mapped] = []
    for name, shape in shapes.items():
        if name.startswith("norm_out.linear."):
            rows = int(shape[0])
            if rows % 2:
                raise MetadataError(f"transformer: {name!r} has an odd number of rows ({rows}); "
                                    "its scale / shift halves cannot be swapped")
            h = rows // 2
            out.append(Mapped("final_layer.adaLN_modulation.1." + name[len("norm_out.linear."):],
                              (Part(name, h, h), Part(name, 0, h)), tuple(shape)))
            continue
        for dp, op in _FLUX_TOP.items():
            if name.startswith(dp):
                out.append(_whole(name, shape, op + name[len(dp):]))
                break
        else:
            m = _BLOCK_RX.match(name)
            if not m:
                raise _unmapped("transformer", name)
            kind, idx, rest = m.groups()
            table, dst = (_FLUX_DOUBLE, f"double_blocks.{idx}.") if kind == "transformer_blocks" \
                else (_FLUX_SINGLE, f"single_blocks.{idx}.")
            for ds, os_, pos in table:
                if rest.startswith(ds):
                    new = dst + os_ + rest[len(ds):]
                    if pos is None:
                        out.append(_whole(name, shape, new))
                    else:
                        fused.setdefault(new, []).append((pos, name))
                    break
            else:
                raise _unmapped("transformer", name)
    for new, members in fused.items():
        members.sort()
        srcs = [n for _, n in members]
        cols = [tuple(shapes[n][1:]) for n in srcs]
        if len(set(cols)) != 1:
            raise MetadataError(f"transformer: cannot fuse {srcs} into {new!r}: row shapes {cols} differ")
        rows = sum(int(shapes[n][0]) for n in srcs)
        out.append(Mapped(new, tuple(Part(n, 0, int(shapes[n][0])) for n in srcs),
                          (rows,) + cols[0]))
    return out


# ------------------------------------------------------ family detection

#: ComfyUI-GGUF's architecture detection (tools/convert.py, ModelTemplate
#: keys_detect / keys_banned), as data: (arch, [key sets, any one matching],
#: keys that mean the diffusers layout, which its loader cannot use).
COMFY_DETECT: Sequence[Tuple[str, Sequence[Sequence[str]], Sequence[str]]] = (
    ("flux", (("transformer_blocks.0.attn.norm_added_k.weight",),
              ("double_blocks.0.img_attn.proj.weight",)),
     ("transformer_blocks.0.attn.norm_added_k.weight",)),
    ("sd3", (("transformer_blocks.0.attn.add_q_proj.weight",),
             ("joint_blocks.0.x_block.attn.qkv.weight",)),
     ("transformer_blocks.0.attn.add_q_proj.weight",)),
    ("aura", (("double_layers.3.modX.1.weight",),
              ("joint_transformer_blocks.3.ff_context.out_projection.weight",)),
     ("joint_transformer_blocks.3.ff_context.out_projection.weight",)),
    ("hidream", (("caption_projection.0.linear.weight",
                  "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight"),), ()),
    ("cosmos", (("blocks.0.mlp.layer1.weight", "blocks.0.adaln_modulation_cross_attn.1.weight"),), ()),
    ("ltxv", (("adaln_single.emb.timestep_embedder.linear_2.weight",
               "transformer_blocks.27.scale_shift_table", "caption_projection.linear_2.weight"),), ()),
    ("hyvid", (("double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"),), ()),
    ("wan", (("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),), ()),
    ("sdxl", (("down_blocks.0.downsamplers.0.conv.weight", "add_embedding.linear_1.weight"),
              ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
               "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight"),
              ("label_emb.0.0.weight",)), ()),
    ("sd1", (("down_blocks.0.downsamplers.0.conv.weight",),
             ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "output_blocks.8.2.conv.weight")), ()),
    ("lumina2", (("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"),), ()),
)

COMFY_ARCHITECTURES = tuple(a for a, _, _ in COMFY_DETECT)


def detect_reference_family(names: Iterable[str]) -> Tuple[Optional[str], bool]:
    """(family, diffusers_layout) of a state dict whose prefixes are stripped,
    with ComfyUI-GGUF's detection order; (None, False) when nothing matches."""
    keys = set(names)
    for arch, sets, banned in COMFY_DETECT:
        for s in sets:
            if all(k in keys for k in s):
                return arch, any(k in keys for k in banned)
    return None, False


def strip_reference_prefix(names: Sequence[str]) -> Tuple[str, List[str]]:
    """ComfyUI-GGUF's prefix rule: "model.diffusion_model." or "model." when
    any key has it (keys without it are dropped), "net." when every key has
    it; returns (prefix, kept names)."""
    for pfx in ("model.diffusion_model.", "model."):
        if any(n.startswith(pfx) for n in names):
            return pfx, [n for n in names if n.startswith(pfx)]
    if names and all(n.startswith("net.") for n in names):
        return "net.", list(names)
    return "", list(names)
