"""Inputs of the diffusion GGUF export: the components of a diffusers pipeline
(or one component, or a single-file checkpoint) and the tensors to write,
each with its source tensors and how they are fused or renamed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


from ...jsonfile import DIFFUSERS_CONFIG_SCHEMA, read_json
from ...errors import ConfigurationError, MetadataError, ModelNotFoundError
from .diffusion_names import (COMFY_ARCHITECTURES, Mapped, Part, clip_to_prefixed,
                              detect_reference_family, flux_to_original, strip_reference_prefix,
                              unet_to_original, vae_to_original)
from .diffusion_types import COMFY_IGNORE, LAYOUTS, MAX_NAME_BYTES, SDCPP_UNUSED

PathLike = Union[str, "os.PathLike[str]"]


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
    return read_json(p, DIFFUSERS_CONFIG_SCHEMA if p.name == "config.json" else dict)


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
    from ...engine.dtypes import QUANTIZABLE_DTYPES

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


