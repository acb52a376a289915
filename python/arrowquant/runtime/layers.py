"""nn.Module layers whose weights stay packed: QuantLinear, QuantConv2d,
QuantEmbedding.

Each holds its weight as the file stores it (docs/FORMAT.md): buffers
``qweight`` (uint8 packed codes, rows x ceil(cols * bits / 8)), ``scales`` and
``zero_points`` (float32 or float16 rows x G; with superblock parameters the
float16 units, rows x S, and ``param_codes``, the packed code stream), and
``input_scales`` (float32, cols) for a channel-equalized weight. Resident
bytes are the quantized size; no float copy of the weight is kept. The
forward passes call the torch operators of runtime/ops.py (C++ kernels on
CPU). On another device the weight is dequantized with torch ops per call.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..engine.tensor import QuantizedTensor
from ..spec import groups_per_row, packed_row_bytes
from . import ops

PARAM_DTYPES = ("float32", "float16", "superblock")


def equalization_scales(entry: Any) -> Optional[np.ndarray]:
    """Per-column scales s of a V2 entry's spatial_quant_json (weight = x_hat / s)."""
    if not getattr(entry, "spatial_quant_json", None):
        return None
    s = np.asarray(json.loads(entry.spatial_quant_json).get("scales", []), dtype=np.float32)
    return s if s.size else None


def _refuse_grid(qt: QuantizedTensor) -> None:
    """The packed layers decode uniform codes only (FORMAT.md sections 2-9)."""
    if getattr(qt, "code_levels", None) is not None:
        from ..errors import FormatError

        raise FormatError(f"tensor {qt.name!r}: quant_type {qt.quant_type} is a code grid "
                          "(FORMAT.md section 10), which the packed runtime layers do not "
                          "decode; load it dequantized (arrowquant.torch.load_model does)")


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codes (uint8, rows x cols) from packed rows (FORMAT.md section 3):
    per byte, code k of the byte sits in bits [k*b, (k+1)*b), low bits first."""
    if bits == 8:
        return packed[:, :cols]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask        # rows x bytes x per_byte
    return codes.reshape(packed.shape[0], -1)[:, :cols]


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                      bits: int, group_size: int, cols: int,
                      input_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 rows x cols from per-group parameters with torch ops (any
    device): x_hat = (q - zero_point) * scale, then / s per column. The same
    float32 operations in the same order as the engine: equal bit for bit."""
    q = unpack_codes(packed, bits, cols).to(torch.float32)
    scales, zero_points = scales.float(), zero_points.float()
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


def expand_superblock(units: torch.Tensor, zero_units: torch.Tensor, stream: torch.Tensor,
                      rows: int, groups: int, code_bits: int,
                      superblock_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group float32 (scales, zero points), rows x G, from superblock
    units and the FORMAT.md 9.3 code stream, with torch ops (any device)."""
    bits = (stream.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=stream.device)) & 1
    bits = bits.reshape(-1)[: rows * groups * 2 * code_bits].reshape(-1, code_bits)
    weights = 2 ** torch.arange(code_bits, device=stream.device, dtype=torch.int32)
    codes = (bits.to(torch.int32) * weights).sum(-1).reshape(rows, groups, 2).float()
    sb = torch.arange(groups, device=stream.device) // superblock_groups
    d = units.float().reshape(rows, -1)[:, sb]
    dz = zero_units.float().reshape(rows, -1)[:, sb]
    return d * codes[..., 0], dz * codes[..., 1]


class _PackedWeight(nn.Module):
    """Buffers and metadata of one packed weight (rows x cols as quantized)."""

    def _init_packed(self, rows: int, cols: int, bits: int, group_size: int, param_dtype: str,
                     has_input_scales: bool, param_code_bits: Optional[int],
                     superblock_groups: Optional[int], device: Any = None) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
        if group_size <= 0:
            raise ValueError(f"group size must be positive, got {group_size}")
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {param_dtype!r}")
        self.rows, self.cols = rows, cols
        self.bits, self.group_size, self.param_dtype = bits, group_size, param_dtype
        G = groups_per_row(cols, group_size)
        self.register_buffer("qweight", torch.zeros(rows, packed_row_bytes(cols, bits),
                                                    dtype=torch.uint8, device=device))
        if param_dtype == "superblock":
            from ..spec import param_code_bytes, superblock_code_bits, superblock_groups as sbg

            self.param_code_bits = int(param_code_bits or superblock_code_bits(bits))
            self.superblock_groups = int(superblock_groups or sbg(group_size))
            S = -(-G // self.superblock_groups)
            self.register_buffer("scales", torch.ones(rows, S, dtype=torch.float16, device=device))
            self.register_buffer("zero_points", torch.zeros(rows, S, dtype=torch.float16,
                                                            device=device))
            self.register_buffer("param_codes", torch.zeros(
                param_code_bytes(rows * G, self.param_code_bits), dtype=torch.uint8,
                device=device))
        else:
            self.param_code_bits, self.superblock_groups = 0, 0
            pdt = torch.float32 if param_dtype == "float32" else torch.float16
            self.register_buffer("scales", torch.ones(rows, G, dtype=pdt, device=device))
            self.register_buffer("zero_points", torch.zeros(rows, G, dtype=pdt, device=device))
            self.param_codes = None
        if has_input_scales:
            self.register_buffer("input_scales", torch.ones(cols, dtype=torch.float32,
                                                            device=device))
        else:
            self.input_scales = None

    def _load_packed(self, qt: QuantizedTensor, input_scales: Optional[np.ndarray]) -> None:
        """Fills the buffers from a QuantizedTensor (its arrays are copied once)."""
        def t(a: np.ndarray, dtype: Any, shape: Sequence[int]) -> torch.Tensor:
            a = np.asarray(a)
            if a.dtype == dtype and a.flags.c_contiguous:
                # Shares the reader's buffer (an Arrow blob read for this
                # tensor alone): no transient second copy, so loading does
                # not leave a hole per tensor in the heap. Arrow marks it
                # read-only; the runtime never writes weights.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.from_numpy(a).reshape(shape)
            return torch.from_numpy(np.array(a, dtype=dtype, copy=True).reshape(shape))

        rows, G = self.rows, groups_per_row(self.cols, self.group_size)
        self.qweight = t(qt.data, np.uint8, (rows, -1))
        if self.param_dtype == "superblock":
            self.scales = t(qt.superblock_scales, np.float16, (rows, -1))
            self.zero_points = t(qt.superblock_zero_points, np.float16, (rows, -1))
            self.param_codes = t(qt.param_codes(), np.uint8, (-1,))
        else:
            pdt = np.float32 if self.param_dtype == "float32" else np.float16
            self.scales = t(qt.scales, pdt, (rows, G))
            self.zero_points = t(qt.zero_points, pdt, (rows, G))
        if input_scales is not None:
            self.input_scales = torch.from_numpy(np.asarray(input_scales, dtype=np.float32).copy())

    def _share_packed(self, other: "_PackedWeight") -> None:
        """Uses another layer's buffers (tied weights: no second copy)."""
        for name in ("qweight", "scales", "zero_points", "param_codes", "input_scales"):
            value = getattr(other, name)
            if value is None:
                setattr(self, name, None)
            else:
                self._buffers[name] = value

    def _packed_args(self) -> Tuple[Any, ...]:
        return (self.qweight, self.scales, self.zero_points, self.param_codes, self.input_scales)

    def _meta_args(self) -> Tuple[Any, ...]:
        return (self.bits, self.group_size, self.param_dtype, self.param_code_bits,
                self.superblock_groups)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight (rows x cols of the quantized view) as float32, or cast to `dtype`."""
        if self.qweight.device.type == "cpu":
            w = ops.weight(*self._packed_args(), self.rows, self.cols,
                                      *self._meta_args())
        else:
            w = self._torch_dequantize()
        return w if dtype is None else w.to(dtype)

    def _torch_dequantize(self) -> torch.Tensor:
        scales, zeros = self.scales, self.zero_points
        if self.param_dtype == "superblock":
            scales, zeros = expand_superblock(
                self.scales, self.zero_points, self.param_codes, self.rows,
                groups_per_row(self.cols, self.group_size), self.param_code_bits,
                self.superblock_groups)
        return dequantize_packed(self.qweight, scales, zeros, self.bits, self.group_size,
                                 self.cols, self.input_scales)

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the module's layout and dtype, dequantized on each
        access (a transient float copy: code that reads ``.weight.shape`` or
        ``.dtype`` works; forward passes never use this)."""
        return self.dequantize_weight(getattr(self, "weight_dtype", None)).view(self.weight_shape)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.rows, self.cols)

    def _packed_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, param_dtype={self.param_dtype}"


class QuantLinear(_PackedWeight):
    """An nn.Linear whose weight stays packed; forward runs the
    ``arrowquant::quant_linear`` operator (output in the input's dtype,
    float32 accumulation)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int = 128, bias: bool = True,
                 dtype: Optional[torch.dtype] = None, device: Any = None,
                 has_input_scales: bool = False, param_dtype: str = "float32",
                 param_code_bits: Optional[int] = None,
                 superblock_groups: Optional[int] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = dtype or torch.float32
        self._init_packed(out_features, in_features, bits, group_size, param_dtype,
                          has_input_scales, param_code_bits, superblock_groups, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32,
                                                 device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                       input_scales: Optional[np.ndarray] = None,
                       dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """From a QuantizedTensor of shape (out, in) (e.g. ``arrowquant.load(p).raw(name)``),
        keeping its parameter storage (float32, float16 or superblock)."""
        _refuse_grid(qt)
        if len(qt.shape) != 2:
            raise ValueError(f"tensor {qt.name!r}: a Linear weight is 2-D, got shape {qt.shape}")
        out_f, in_f = qt.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_f, out_f
        layer.weight_dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer._init_packed(out_f, in_f, qt.bits, qt.group_size, _param_dtype(qt),
                           input_scales is not None, _code_bits(qt), _sb_groups(qt), "meta")
        layer._load_packed(qt, input_scales)
        layer.bias = None if bias is None else nn.Parameter(
            bias.detach().to(dtype or bias.dtype).clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            w = self._torch_dequantize().to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return ops.linear(x, *self._packed_args(), self.bias, self.out_features,
                                *self._meta_args())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._packed_repr()}, bias={self.bias is not None}")


class QuantConv2d(_PackedWeight):
    """An nn.Conv2d whose weight [out, in / groups, kh, kw] stays packed
    (grouped along in / groups * kh * kw, as quantized); forward runs
    ``arrowquant::quant_conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", bits: int = 4, group_size: int = 128,
                 dtype: Optional[torch.dtype] = None, device: Any = None,
                 has_input_scales: bool = False, param_dtype: str = "float32",
                 param_code_bits: Optional[int] = None,
                 superblock_groups: Optional[int] = None) -> None:
        super().__init__()
        self.weight_dtype = dtype or torch.float32
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        padding_mode)
        self._init_packed(out_channels, in_channels // groups * self.kernel_size[0] *
                          self.kernel_size[1], bits, group_size, param_dtype, has_input_scales,
                          param_code_bits, superblock_groups, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype or torch.float32,
                                                 device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _init_conv(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any,
                   padding: Any, dilation: Any, groups: int, padding_mode: str) -> None:
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.dilation = pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise ValueError("padding='same' needs stride 1")
                total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if any(t % 2 for t in total):
                    raise ValueError("padding='same' with an even kernel extent is not supported")
                padding = tuple(t // 2 for t in total)
            else:
                raise ValueError(f"unknown padding {padding!r}")
        self.padding = pair(padding)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.padding_mode = padding_mode

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, conv: nn.Conv2d,
                       bias: Optional[torch.Tensor] = None,
                       input_scales: Optional[np.ndarray] = None,
                       dtype: Optional[torch.dtype] = None) -> "QuantConv2d":
        """From a QuantizedTensor of shape (out, in / groups, kh, kw), with
        the geometry (stride, padding, ...) of `conv` (may be on the meta device)."""
        _refuse_grid(qt)
        expect = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
        if tuple(qt.shape) != expect:
            raise ValueError(f"tensor {qt.name!r}: shape {tuple(qt.shape)} does not match the "
                             f"convolution's {expect}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight_dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer._init_conv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        layer._init_packed(qt.shape[0], int(np.prod(qt.shape[1:])), qt.bits, qt.group_size,
                           _param_dtype(qt), input_scales is not None, _code_bits(qt),
                           _sb_groups(qt), "meta")
        layer._load_packed(qt, input_scales)
        layer.bias = None if bias is None else nn.Parameter(
            bias.detach().to(dtype or bias.dtype).clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = list(self.padding)
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = [0, 0]
        if x.device.type != "cpu":
            w = self._torch_dequantize().to(x.dtype).view(
                self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.conv2d(x, w, b, self.stride, padding, self.dilation, self.groups)
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        y = ops.conv2d(x.contiguous(), *self._packed_args(), self.bias, self.out_channels,
                             *self._meta_args(), list(self.kernel_size), list(self.stride),
                             padding, list(self.dilation), self.groups)
        return y.squeeze(0) if squeeze else y

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"{self._packed_repr()}, bias={self.bias is not None}")


class QuantEmbedding(_PackedWeight):
    """An nn.Embedding whose table stays packed: a lookup dequantizes only
    the rows it returns (``arrowquant::quant_embedding``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4,
                 group_size: int = 128, padding_idx: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device: Any = None,
                 has_input_scales: bool = False, param_dtype: str = "float32",
                 param_code_bits: Optional[int] = None,
                 superblock_groups: Optional[int] = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight_dtype = dtype or torch.float32
        self._init_packed(num_embeddings, embedding_dim, bits, group_size, param_dtype,
                          has_input_scales, param_code_bits, superblock_groups, device)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, padding_idx: Optional[int] = None,
                       input_scales: Optional[np.ndarray] = None,
                       dtype: Optional[torch.dtype] = None) -> "QuantEmbedding":
        _refuse_grid(qt)
        if len(qt.shape) != 2:
            raise ValueError(f"tensor {qt.name!r}: an embedding table is 2-D, got {qt.shape}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.num_embeddings, layer.embedding_dim = qt.shape
        layer.padding_idx = padding_idx
        layer.weight_dtype = dtype or torch.float32
        layer._init_packed(qt.shape[0], qt.shape[1], qt.bits, qt.group_size, _param_dtype(qt),
                           input_scales is not None, _code_bits(qt), _sb_groups(qt), "meta")
        layer._load_packed(qt, input_scales)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type != "cpu":
            return F.embedding(ids, self._torch_dequantize().to(self.weight_dtype))
        out = ops.embedding(ids, *self._packed_args(), self.rows, self.cols,
                                  *self._meta_args())
        return out.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._packed_repr()}"


def _param_dtype(qt: QuantizedTensor) -> str:
    return qt.param_dtype if qt.param_dtype in PARAM_DTYPES else "float32"


def _code_bits(qt: QuantizedTensor) -> Optional[int]:
    return qt.param_code_bits if qt.param_dtype == "superblock" else None


def _sb_groups(qt: QuantizedTensor) -> Optional[int]:
    return qt.superblock_groups if qt.param_dtype == "superblock" else None


def module_weight_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what stays resident),
    each storage counted once (tied weights share one)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


__all__ = ["QuantLinear", "QuantConv2d", "QuantEmbedding", "unpack_codes", "dequantize_packed",
           "expand_superblock", "module_weight_bytes", "equalization_scales"]
