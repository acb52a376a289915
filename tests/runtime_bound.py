"""The error bound of the quantized matmul (cpp/include/arrowquant/matmul.h),
for tests: against dequantize + a float64 matmul, every output obeys

    |y - y_exact| <= gamma(n) * m + 4u * m  (+ output rounding),
    m = sum_c |x'_c| (|q_c| + |z|) |s| + |b|,  gamma(n) = n u / (1 - n u),
    u = 2^-24,  n = cols + G + 32,  x' = x / s_eq,

where the 4u * m term covers the reference weight's own rounding (the
engine's dequantized weight is one rounding off (q - z) s, and the
equalization division another). bfloat16 / float16 outputs add their
rounding: 2^-8 resp. 2^-11 relative, and 2^-25 absolute for float16
subnormals."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

U = 2.0 ** -24


def expanded_params(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group float32 (scales, zero points), rows x G, of a packed layer."""
    from arrowquant.runtime.layers import expand_superblock
    from arrowquant.spec import groups_per_row

    if layer.param_dtype == "superblock":
        return expand_superblock(layer.scales, layer.zero_points, layer.param_codes, layer.rows,
                                 groups_per_row(layer.cols, layer.group_size),
                                 layer.param_code_bits, layer.superblock_groups)
    return layer.scales.float(), layer.zero_points.float()


def exact_and_bound(layer, x: torch.Tensor, bias: Optional[torch.Tensor],
                    out_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_exact, bound) in float64 for y = x @ W^T + b, x of shape (..., cols)."""
    from arrowquant.runtime.layers import unpack_codes

    cols, g = layer.cols, layer.group_size
    s, z = expanded_params(layer)
    idx = torch.arange(cols) // g
    q = unpack_codes(layer.qweight, layer.bits, cols).double()
    s_c, z_c = s.double()[:, idx], z.double()[:, idx]
    x2 = x.reshape(-1, cols).double()
    xe = x2 if layer.input_scales is None else x2 / layer.input_scales.double()
    w = layer.dequantize_weight().double()
    exact = x2 @ w.T
    mag = xe.abs() @ ((q + z_c.abs()) * s_c.abs()).T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    n = cols + s.shape[1] + 32
    bound = (n * U / (1 - n * U) + 4 * U) * mag
    if out_dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * (exact.abs() + bound)
    elif out_dtype == torch.float16:
        bound = bound + 2.0 ** -11 * (exact.abs() + bound) + 2.0 ** -25
    shape = list(x.shape[:-1]) + [layer.rows]
    return exact.reshape(shape), bound.reshape(shape)


def assert_within_bound(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor,
                        what: str = "") -> float:
    """Asserts |got - exact| <= bound everywhere; returns max(err / bound)."""
    err = (got.double() - exact).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs outside the bound; "
                           f"worst err {float(err.max()):.3g}, bound there "
                           f"{float(bound.flatten()[err.flatten().argmax()]):.3g}")
    return float((err / bound.clamp_min(1e-300)).max())
