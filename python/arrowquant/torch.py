"""ArrowQuant V2 models in PyTorch (needs torch; ``import arrowquant`` never
imports this module).

* ``load_model(path)``: a quantized transformers model directory as a ready
  model whose Linear / Embedding weights stay packed (QuantLinear,
  QuantEmbedding), built on the meta device: no float copy of a quantized
  weight is ever allocated. Diffusers pipelines: ``arrowquant.diffusers``.
* ``QuantLinear``, ``QuantConv2d``, ``QuantEmbedding``: layers holding the
  packed codes and parameters as the file stores them; their forward passes
  are torch operators (``torch.ops.arrowquant.quant_linear`` ...) over the C++
  GEMV / GEMM kernels, usable under ``torch.inference_mode`` and
  ``torch.compile``.
* ``replace_linear(model, path)``: swaps an existing model's Linear layers
  for QuantLinear from a V2 directory, and loads its other tensors.
* ``load_state_dict(path, dtype)``: every tensor dequantized (a float state
  dict for the original architecture).

The implementation lives in arrowquant.runtime (ops, layers, loaders).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "arrowquant.torch needs PyTorch: pip install 'arrowquant[torch]' "
        "(on this machine kind: pip install torch==2.13.0)") from exc

from .runtime import ops
from .runtime.layers import (QuantConv2d, QuantEmbedding, QuantLinear, dequantize_packed,
                             equalization_scales, expand_superblock, module_weight_bytes,
                             unpack_codes)
from .runtime.loaders import LoadReport, load_model, parameters_on_meta, populate

PathLike = Any

_NP_INT_DTYPES = {"float64": np.float64, "int64": np.int64, "int32": np.int32,
                  "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def _open(path: Union[PathLike, Any]) -> Any:
    from .api import load

    if hasattr(path, "entries") and hasattr(path, "raw"):
        return path  # already an open QuantizedModel
    return load(path)


def load_state_dict(path: PathLike, dtype: Optional["torch.dtype"] = torch.float16,
                    device: Union[str, "torch.device"] = "cpu",
                    names: Optional[Iterable[str]] = None) -> Dict[str, "torch.Tensor"]:
    """A state dict of the V2 model at `path`: quantized tensors dequantized
    (channel equalization undone) and cast to `dtype` (None: float32);
    unquantized floating-point tensors cast to `dtype`; integer and bool
    tensors keep their type. Tensors are read one at a time."""
    model = _open(path)
    out: Dict[str, torch.Tensor] = {}
    for name in (names if names is not None else list(model.entries)):
        entry = model.info(name)
        if entry.quant_type == "none" and entry.dtype in _NP_INT_DTYPES:
            arr = model.dequantize(name, out_dtype=_NP_INT_DTYPES[entry.dtype])
            t = torch.from_numpy(np.array(arr, copy=True))
            if entry.dtype == "float64" and dtype is not None:
                t = t.to(dtype)
        else:
            arr = model.dequantize(name, out_dtype=np.float32)
            t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
            if dtype is not None:
                t = t.to(dtype)
        out[name] = t.to(device)
    return out


def replace_linear(model: "nn.Module", path: PathLike, *, load_other_tensors: bool = True,
                   dtype: Optional["torch.dtype"] = None,
                   skip: Iterable[str] = ()) -> List[str]:
    """Replaces every nn.Linear of `model` whose weight is stored quantized in
    the V2 directory `path` by a QuantLinear holding that weight (bias from
    the file when present, else the layer's own). With `load_other_tensors`,
    the file's remaining tensors (embeddings, norms, convolutions, ...) are
    loaded into the model too, dequantized to their parameter's dtype.
    Returns the names of the replaced modules. (``load_model`` builds the
    model itself, without float weights, and packs convolutions and
    embeddings too.)"""
    qmodel = _open(path)
    skip = set(skip)
    replaced: List[str] = []
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name not in skip]
    for name, mod in targets:
        wname = f"{name}.weight"
        entry = qmodel.entries.get(wname)
        if entry is None or entry.quant_type == "none" or len(entry.shape) != 2:
            continue
        if entry.code_levels is not None:  # a code grid: the float layer, dequantized
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(qmodel.dequantize(wname)).to(mod.weight.dtype))
            continue
        if tuple(entry.shape) != (mod.out_features, mod.in_features):
            raise ValueError(f"{wname}: file shape {tuple(entry.shape)} does not match the model's "
                             f"({mod.out_features}, {mod.in_features})")
        bname = f"{name}.bias"
        bias = mod.bias.detach() if mod.bias is not None else None
        if bname in qmodel.entries and mod.bias is not None:
            bias = load_state_dict(qmodel, dtype=None, names=[bname])[bname]
        pdtype = dtype or mod.weight.dtype
        layer = QuantLinear.from_quantized(qmodel.raw(wname), bias=bias,
                                           input_scales=equalization_scales(entry), dtype=pdtype)
        layer.to(mod.weight.device)
        _set_submodule(model, name, layer)
        replaced.append(name)
    if load_other_tensors:
        done = {f"{n}.weight" for n in replaced} | {f"{n}.bias" for n in replaced}
        state = model.state_dict()
        rest = [n for n in qmodel.entries if n not in done and n in state]
        tensors = load_state_dict(qmodel, dtype=None, names=rest)
        with torch.no_grad():
            for n, t in tensors.items():
                target = state[n]
                if tuple(target.shape) != tuple(t.shape):
                    raise ValueError(f"{n}: file shape {tuple(t.shape)} does not match the "
                                     f"model's {tuple(target.shape)}")
                target.copy_(t.to(target.dtype))
    return replaced


def _set_submodule(model: "nn.Module", name: str, new: "nn.Module") -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = ["load_model", "load_state_dict", "QuantLinear", "QuantConv2d", "QuantEmbedding",
           "replace_linear", "populate", "parameters_on_meta", "LoadReport", "unpack_codes",
           "dequantize_packed", "expand_superblock", "module_weight_bytes", "ops"]
