"""Loading ArrowQuant V2 models into PyTorch.

* ``load_state_dict(path, dtype=torch.float16)``: every tensor dequantized,
  ready for ``model.load_state_dict`` of the original architecture.
* ``QuantLinear``: an ``nn.Linear`` replacement that keeps the packed codes,
  scales and zero points (and channel-equalization scales when the file has
  them) as buffers and dequantizes in ``forward`` with vectorized torch ops,
  so the weights stay at INT2/4/8 size in memory.
* ``replace_linear(model, path)``: swaps a model's Linear layers for
  QuantLinear built from a V2 directory, and loads its other tensors.

torch is optional for ArrowQuant: ``import arrowquant`` never imports this
module (nor torch); importing this module needs torch.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "arrowquant.torch needs PyTorch: pip install 'arrowquant[torch]' "
        "(on this machine kind: pip install torch==2.13.0)") from exc

from .engine.tensor import QuantizedTensor
from .spec import groups_per_row, packed_row_bytes

PathLike = Any

_NP_INT_DTYPES = {"float64": np.float64, "int64": np.int64, "int32": np.int32,
                  "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def _open(path: Union[PathLike, Any]) -> Any:
    from .api import load

    if hasattr(path, "entries") and hasattr(path, "raw"):
        return path  # already an open QuantizedModel
    return load(path)


def _equalization(entry: Any) -> Optional[np.ndarray]:
    """Per-input-channel scales s of FORMAT.md's spatial_quant_json (weight = x_hat / s)."""
    if not entry.spatial_quant_json:
        return None
    s = np.asarray(json.loads(entry.spatial_quant_json).get("scales", []), dtype=np.float32)
    return s if s.size else None


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


def unpack_codes(packed: "torch.Tensor", bits: int, cols: int) -> "torch.Tensor":
    """Codes (uint8, rows x cols) from packed rows (FORMAT.md section 3):
    per byte, code k of the byte sits in bits [k*b, (k+1)*b), low bits first."""
    if bits == 8:
        return packed[:, :cols]
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask        # rows x bytes x per_byte
    return codes.reshape(packed.shape[0], -1)[:, :cols]


def dequantize_packed(packed: "torch.Tensor", scales: "torch.Tensor", zero_points: "torch.Tensor",
                      bits: int, group_size: int, cols: int,
                      input_scales: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """float32 rows x cols: x_hat = (q - zero_point) * scale, group-wise (the
    last group of a row may be shorter), then / s per column if equalized.
    The same float32 operations in the same order as the engine: equal bit for bit."""
    q = unpack_codes(packed, bits, cols).to(torch.float32)
    G = scales.shape[1]
    if G * group_size == cols:
        qg = q.view(q.shape[0], G, group_size)
        w = ((qg - zero_points.unsqueeze(-1)) * scales.unsqueeze(-1)).view(q.shape[0], cols)
    else:
        s = scales.repeat_interleave(group_size, dim=1)[:, :cols]
        z = zero_points.repeat_interleave(group_size, dim=1)[:, :cols]
        w = (q - z) * s
    if input_scales is not None:
        w = w / input_scales.unsqueeze(0)
    return w


class QuantLinear(nn.Module):
    """A Linear layer whose weight stays quantized in memory.

    Buffers: ``qweight`` (uint8, out x ceil(in*bits/8): packed codes),
    ``scales`` and ``zero_points`` (float32, out x ceil(in/group_size)), and
    ``input_scales`` (float32, in) when the layer was channel-equalized. The
    weight is dequantized in float32 at every forward (exactly as the engine
    does), cast to the input's dtype, and used with ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 128, bias: bool = True,
                 dtype: Optional["torch.dtype"] = None, device: Any = None,
                 has_input_scales: bool = False) -> None:
        super().__init__()
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        if group_size <= 0:
            raise ValueError(f"group size must be positive, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        G = groups_per_row(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(
            out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("zero_points", torch.zeros(out_features, G, dtype=torch.float32,
                                                        device=device))
        if has_input_scales:
            self.register_buffer("input_scales", torch.ones(in_features, dtype=torch.float32,
                                                            device=device))
        else:
            self.input_scales = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32,
                                                 device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Optional["torch.Tensor"] = None,
                       input_scales: Optional[np.ndarray] = None,
                       dtype: Optional["torch.dtype"] = None) -> "QuantLinear":
        """From a QuantizedTensor of shape (out, in) (e.g. ``arrowquant.load(p).raw(name)``)."""
        if len(qt.shape) != 2:
            raise ValueError(f"tensor {qt.name!r}: a Linear weight is 2-D, got shape {qt.shape}")
        out_f, in_f = qt.shape
        layer = cls(in_f, out_f, qt.bits, qt.group_size, bias=bias is not None, dtype=dtype,
                    has_input_scales=input_scales is not None)
        G = groups_per_row(in_f, qt.group_size)
        layer.qweight.copy_(torch.from_numpy(
            np.array(qt.data, dtype=np.uint8, copy=True).reshape(out_f, -1)))
        layer.scales.copy_(torch.from_numpy(
            np.array(qt.scales, dtype=np.float32, copy=True).reshape(out_f, G)))
        layer.zero_points.copy_(torch.from_numpy(
            np.array(qt.zero_points, dtype=np.float32, copy=True).reshape(out_f, G)))
        if input_scales is not None:
            layer.input_scales.copy_(torch.from_numpy(np.asarray(input_scales, dtype=np.float32)))
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.to(layer.bias.dtype))
        return layer

    def dequantize_weight(self, dtype: Optional["torch.dtype"] = None) -> "torch.Tensor":
        """The weight (out x in) as float32, or cast to `dtype`."""
        w = dequantize_packed(self.qweight, self.scales, self.zero_points, self.bits,
                              self.group_size, self.in_features, self.input_scales)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        w = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def replace_linear(model: "nn.Module", path: PathLike, *, load_other_tensors: bool = True,
                   dtype: Optional["torch.dtype"] = None,
                   skip: Iterable[str] = ()) -> List[str]:
    """Replaces every nn.Linear of `model` whose weight is stored quantized in
    the V2 directory `path` by a QuantLinear holding that weight (bias from
    the file when present, else the layer's own). With `load_other_tensors`,
    the file's remaining tensors (embeddings, norms, convolutions, ...) are
    loaded into the model too, dequantized to their parameter's dtype.
    Returns the names of the replaced modules."""
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
        if tuple(entry.shape) != (mod.out_features, mod.in_features):
            raise ValueError(f"{wname}: file shape {tuple(entry.shape)} does not match the model's "
                             f"({mod.out_features}, {mod.in_features})")
        bname = f"{name}.bias"
        bias = mod.bias.detach() if mod.bias is not None else None
        if bname in qmodel.entries and mod.bias is not None:
            bias = load_state_dict(qmodel, dtype=None, names=[bname])[bname]
        pdtype = dtype or mod.weight.dtype
        layer = QuantLinear.from_quantized(qmodel.raw(wname), bias=bias,
                                           input_scales=_equalization(entry), dtype=pdtype)
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


def module_weight_bytes(model: "nn.Module") -> int:
    """Bytes held by a module's parameters and buffers (what stays resident)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


__all__ = ["load_state_dict", "QuantLinear", "replace_linear", "unpack_codes",
           "dequantize_packed", "module_weight_bytes"]
