"""torch operators over the C++ quantized matmul (cpp/include/arrowquant/matmul.h).

``arrowquant::quant_linear``, ``arrowquant::quant_conv2d`` and
``arrowquant::quant_embedding`` are registered with ``torch.library.custom_op``:
they run under ``torch.inference_mode`` and under ``torch.compile`` (each has
a fake implementation, so the compiler traces through them as opaque calls;
no graph break). The C++ extension is not built against torch: tensors reach
it through DLPack (nanobind's ndarray), without copies, and the kernels
release the GIL.

Weights stay packed. A weight is described by its buffers (codes, scales,
zero points, the superblock code stream, equalization scales) plus a few
integers; ``QuantWeightSpec`` bundles the integers.

Which kernel runs for a batch of ``M`` rows of x (``Policy``):

* ``M <= gemv_max_batch``: the GEMV kernel, weight streamed once, codes
  decoded in registers (memory-bound: its time follows the packed size).
* otherwise the C++ GEMM (a panel of rows dequantized into a cache-sized
  buffer, register-blocked float kernel), or, from ``blas_min_batch`` rows,
  the panel handed to torch's BLAS (``torch.mm`` on a dequantized panel of
  ``panel_bytes``). The defaults come from benches/runtime_benchmark.py
  (see benches/README.md, "Run in PyTorch"); ``set_policy`` changes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
from torch import Tensor

from ..engine import core as _core

#: Activation dtypes the kernels take; others are computed in float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Policy:
    """Kernel choice by the number of rows of x (see the module docstring)."""

    # Measured (benches/README.md, policy tables): the GEMV, in chunks of 4
    # rows of x, beats the C++ GEMM through 8 rows at 1 and 2 threads, INT4
    # and INT8; the GEMM wins from 16.
    gemv_max_batch: int = 8
    # torch BLAS on dequantized panels was faster than the C++ GEMM only in
    # some cases (1 thread, 256+ rows) and slower in others (2 threads):
    # not used unless lowered.
    blas_min_batch: int = 1 << 62
    panel_bytes: int = 16 << 20     # float32 panel handed to torch.mm (fits L3)
    # QuantConv2d: "dequantize" (transient float weight + conv2d), "unfold"
    # (unfolded input through the GEMM), or "auto": unfold when the GEMM has
    # at most conv_unfold_max_rows rows (batch x output pixels), where the
    # dequantization would cost more than the convolution (measured: a
    # 1280-channel 3x3 conv on 8x8 pixels, batch 2 = 128 rows, runs 1.5x
    # faster unfolded; 16x16 and larger run faster dequantized).
    conv: str = "auto"
    conv_unfold_max_rows: int = 256


_policy = Policy()


def policy() -> Policy:
    return _policy


def set_policy(**changes) -> Policy:
    """Changes the kernel choice (fields of Policy); returns the new policy."""
    global _policy
    if "conv" in changes and changes["conv"] not in ("dequantize", "unfold", "auto"):
        raise ValueError("conv policy must be 'dequantize', 'unfold' or 'auto', got "
                         f"{changes['conv']!r}")
    _policy = replace(_policy, **changes)
    return _policy


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


def _dequantize_rows(codes: Tensor, scales: Tensor, zero_points: Tensor,
                     param_codes: Optional[Tensor], input_scales: Optional[Tensor], rows: int,
                     cols: int, bits: int, group_size: int, params: str, param_code_bits: int,
                     superblock_groups: int, row_begin: int, row_end: int,
                     out: Optional[Tensor] = None) -> Tensor:
    if out is None:
        out = torch.empty(row_end - row_begin, cols, dtype=torch.float32)
    _core.dequantize_matrix_rows(codes, scales, zero_points, _opt(param_codes), _opt(input_scales),
                                 out, rows, cols, bits, group_size, params, param_code_bits,
                                 superblock_groups, row_begin, row_end, _threads())
    return out


def _blas_linear(x2: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor,
                 param_codes: Optional[Tensor], input_scales: Optional[Tensor],
                 bias: Optional[Tensor], rows: int, bits: int, group_size: int, params: str,
                 param_code_bits: int, superblock_groups: int) -> Tensor:
    """y^T panel by panel: a float32 panel of weight rows (cache-sized, reused)
    times x^T with torch.mm, written into consecutive rows of y^T."""
    cols = x2.shape[1]
    xf = x2.float()
    yt = torch.empty(rows, x2.shape[0], dtype=torch.float32)
    step = max(16, min(rows, _policy.panel_bytes // max(1, 4 * cols)))
    panel = torch.empty(step, cols, dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        p = _dequantize_rows(codes, scales, zero_points, param_codes, input_scales, rows, cols,
                             bits, group_size, params, param_code_bits, superblock_groups, r0, r1,
                             out=panel[: r1 - r0])
        torch.mm(p, xf.t(), out=yt[r0:r1])
    y = yt.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype).contiguous()


def _quant_linear_impl(x: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor,
                 param_codes: Optional[Tensor], input_scales: Optional[Tensor],
                 bias: Optional[Tensor], out_features: int, bits: int, group_size: int,
                 params: str, param_code_bits: int, superblock_groups: int) -> Tensor:
    """y = x @ W^T + bias for the packed W (out_features x x.shape[-1])."""
    cols = x.shape[-1]
    lead = list(x.shape[:-1])
    dtype = x.dtype
    if dtype not in KERNEL_DTYPES:
        x = x.float()
    x2 = x.reshape(-1, cols).contiguous()
    if bias is not None and bias.dtype not in KERNEL_DTYPES:
        bias = bias.float()
    batch = x2.shape[0]
    if batch >= _policy.blas_min_batch and batch > _policy.gemv_max_batch:
        y = _blas_linear(x2, codes, scales, zero_points, param_codes, input_scales, bias,
                         out_features, bits, group_size, params, param_code_bits,
                         superblock_groups)
    else:
        y = torch.empty(batch, out_features, dtype=x2.dtype)
        path = "gemv" if batch <= _policy.gemv_max_batch else "gemm"
        _core.quant_matmul(x2, codes, scales, zero_points, _opt(param_codes), _opt(input_scales),
                           None if bias is None else bias.contiguous(), y, out_features, cols,
                           bits, group_size, params, param_code_bits, superblock_groups,
                           _threads(), path)
    return y.reshape(lead + [out_features]).to(dtype)


quant_linear = torch.library.custom_op("arrowquant::quant_linear", _quant_linear_impl,
                                       mutates_args=())


@quant_linear.register_fake
def _(x, codes, scales, zero_points, param_codes, input_scales, bias, out_features, bits,
      group_size, params, param_code_bits, superblock_groups):
    return x.new_empty(list(x.shape[:-1]) + [out_features])


def _dequantize_weight_impl(codes: Tensor, scales: Tensor, zero_points: Tensor,
                      param_codes: Optional[Tensor], input_scales: Optional[Tensor], rows: int,
                      cols: int, bits: int, group_size: int, params: str, param_code_bits: int,
                      superblock_groups: int) -> Tensor:
    """The whole weight as float32 rows x cols (dequantize, then / s)."""
    return _dequantize_rows(codes, scales, zero_points, param_codes, input_scales, rows, cols,
                            bits, group_size, params, param_code_bits, superblock_groups, 0, rows)


dequantize_weight = torch.library.custom_op("arrowquant::dequantize_weight",
                                            _dequantize_weight_impl, mutates_args=())


@dequantize_weight.register_fake
def _(codes, scales, zero_points, param_codes, input_scales, rows, cols, bits, group_size,
      params, param_code_bits, superblock_groups):
    return codes.new_empty((rows, cols), dtype=torch.float32)


def _quant_embedding_impl(ids: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor,
                    param_codes: Optional[Tensor], input_scales: Optional[Tensor], rows: int,
                    cols: int, bits: int, group_size: int, params: str, param_code_bits: int,
                    superblock_groups: int) -> Tensor:
    """Rows `ids` of W as float32 (ids.shape + [cols]): only those rows are dequantized."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), cols, dtype=torch.float32)
    _core.dequantize_matrix_gather(codes, scales, zero_points, _opt(param_codes),
                                   _opt(input_scales), flat, out, rows, cols, bits, group_size,
                                   params, param_code_bits, superblock_groups, _threads())
    return out.reshape(list(ids.shape) + [cols])


quant_embedding = torch.library.custom_op("arrowquant::quant_embedding", _quant_embedding_impl,
                                          mutates_args=())


@quant_embedding.register_fake
def _(ids, codes, scales, zero_points, param_codes, input_scales, rows, cols, bits, group_size,
      params, param_code_bits, superblock_groups):
    return codes.new_empty(list(ids.shape) + [cols], dtype=torch.float32)


def eager(op, impl):
    """The operator for tracing (torch.compile / export sees one opaque call),
    its implementation called directly in eager mode (no dispatcher round
    trip: about 25 us less per call)."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)
    call.__doc__ = impl.__doc__
    return call


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _quant_conv2d_impl(x: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor,
                 param_codes: Optional[Tensor], input_scales: Optional[Tensor],
                 bias: Optional[Tensor], out_channels: int, bits: int, group_size: int,
                 params: str, param_code_bits: int, superblock_groups: int,
                 kernel_size: List[int], stride: List[int], padding: List[int],
                 dilation: List[int], groups: int) -> Tensor:
    """conv2d with the packed weight [out, in / groups, kh, kw] (2-D view
    out x in/groups*kh*kw, as quantized), zero padding. Computed in float32
    (the input converted exactly), returned in x's dtype."""
    kh, kw = kernel_size
    cin = x.shape[1]
    cols = cin // groups * kh * kw
    dtype = x.dtype
    n, _, h, w = x.shape
    ho = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    unfold = _policy.conv == "unfold" or (_policy.conv == "auto" and
                                          n * ho * wo <= _policy.conv_unfold_max_rows)
    if unfold and groups == 1:
        if kh == kw == 1 and padding == [0, 0] and dilation == [1, 1]:
            xs = x[:, :, ::stride[0], ::stride[1]]
            cols_in = xs.permute(0, 2, 3, 1).reshape(-1, cin)
        else:
            cols_in = torch.nn.functional.unfold(x, (kh, kw), dilation=dilation, padding=padding,
                                                 stride=stride).transpose(1, 2).reshape(-1, cols)
        y = _quant_linear_impl(cols_in, codes, scales, zero_points, param_codes, input_scales, bias,
                         out_channels, bits, group_size, params, param_code_bits,
                         superblock_groups)
        return y.reshape(n, ho, wo, out_channels).permute(0, 3, 1, 2).contiguous()
    w = _dequantize_rows(codes, scales, zero_points, param_codes, input_scales, out_channels, cols,
                         bits, group_size, params, param_code_bits, superblock_groups, 0,
                         out_channels)
    w = w.view(out_channels, cin // groups, kh, kw)
    b = None if bias is None else bias.float()
    y = torch.nn.functional.conv2d(x.float(), w, b, stride, padding, dilation, groups)
    return y.to(dtype)


quant_conv2d = torch.library.custom_op("arrowquant::quant_conv2d", _quant_conv2d_impl,
                                       mutates_args=())


@quant_conv2d.register_fake
def _(x, codes, scales, zero_points, param_codes, input_scales, bias, out_channels, bits,
      group_size, params, param_code_bits, superblock_groups, kernel_size, stride, padding,
      dilation, groups):
    n, _, h, w = x.shape
    ho = conv_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((n, out_channels, ho, wo))


linear = eager(quant_linear, _quant_linear_impl)
conv2d = eager(quant_conv2d, _quant_conv2d_impl)
embedding = eager(quant_embedding, _quant_embedding_impl)
weight = eager(dequantize_weight, _dequantize_weight_impl)


def active_kernel() -> str:
    """The matmul path on this CPU ("avx2" or "scalar")."""
    return _core.active_matmul_kernel()


__all__ = ["Policy", "policy", "set_policy", "quant_linear", "quant_conv2d", "quant_embedding",
           "dequantize_weight", "linear", "conv2d", "embedding", "weight", "active_kernel",
           "KERNEL_DTYPES"]
