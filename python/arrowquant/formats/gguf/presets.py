"""llama.cpp's quantization presets (Q4_K_M, IQ4_XS, ...) as per-tensor type
rules: one table for the LLM files (llama.cpp's ``llama_tensor_get_type``)
and the diffusion files (ComfyUI-GGUF's patched copy of it), the type
geometry both use, and llama.cpp's fallback when a row is no whole number
of a type's blocks.

The facts come from llama.cpp's src/llama-quant.cpp (``llama_tensor_get_type``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
``llama_ftype_get_default_type``, ``tensor_allows_quantization``) and
ComfyUI-GGUF's tools/lcpp.patch (``img_tensor_get_type``); docs/gguf.md
("Presets") cites each rule.

A rule row ``(category, presets, condition, type)`` says: a tensor of that
category under one of those presets, when the condition holds for its
position, is stored as that type. The first matching row wins; no row: the
preset's base type. Conditions (``i`` the tensor's index among the tensors
of its category in layer order, ``n`` the number of layers):

* ``always``;
* ``more_bits``: llama.cpp's use_more_bits, i < n/8 or i >= 7n/8 or
  (i - n/8) % 3 == 2 (the first and last eighth and every third between);
* ``first_8th`` i < n/8, ``first_16th`` i < n/16, ``first_2`` i < 2,
  ``first_4`` i < 4;
* ``gqa4``: the model shares each key/value head among >= 4 query heads;
* ``no_imatrix_first_8th`` / ``imatrix_first_8th``: i < n/8 and no
  importance statistics given / given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

#: Elements per block of each block type (a row must be a multiple).
BLOCK_SIZE: Dict[str, int] = {
    "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32,
    "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
#: Bits per weight of each type (block bytes * 8 / block size).
BPW: Dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K": 5.5,
    "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K": 3.4375, "Q2_K": 2.625}

#: llama_ftype_get_default_type: each preset's base type (the type of every
#: quantizable tensor no rule raises).
PRESETS: Dict[str, str] = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K", "Q8_0": "Q8_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}
#: The names the CLI offers as mixes (the plain-type names above are also
#: types: as a preset they add llama.cpp's output / embedding rules).
MIX_PRESETS: Tuple[str, ...] = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                                "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS")

#: tensor_type_fallback: the type used when a row is not a multiple of the
#: chosen type's 256-block (then F16 if even that block does not divide it).
FALLBACK: Dict[str, str] = {
    "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
    "Q6_K": "Q8_0"}

Row = Tuple[str, Tuple[str, ...], str, str]

#: llama_tensor_get_type_impl for the non-MoE, non-Falcon, non-70B models
#: this writer maps (Llama, Mistral, Qwen2/3, BERT). Categories: attn_v
#: (attn_v, attn_qkv, attn_kv_b), ffn_down, attn_output. The output and
#: tied-embedding rule is in llama_preset_type.
LLAMA_RULES: Tuple[Row, ...] = (
    ("attn_v", ("Q2_K",), "gqa4", "Q4_K"),
    ("attn_v", ("Q2_K",), "always", "Q3_K"),
    ("attn_v", ("Q3_K_M",), "first_2", "Q5_K"),
    ("attn_v", ("Q3_K_M",), "always", "Q4_K"),
    ("attn_v", ("Q3_K_L",), "always", "Q5_K"),
    ("attn_v", ("IQ4_NL", "IQ4_XS"), "gqa4", "Q5_K"),
    ("attn_v", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
    ("attn_v", ("Q4_K_S",), "first_4", "Q5_K"),
    ("ffn_down", ("Q2_K",), "always", "Q3_K"),
    ("ffn_down", ("Q3_K_M",), "first_16th", "Q5_K"),
    ("ffn_down", ("Q3_K_M",), "always", "Q4_K"),
    ("ffn_down", ("Q3_K_L",), "always", "Q5_K"),
    ("ffn_down", ("Q4_K_M",), "more_bits", "Q6_K"),
    ("ffn_down", ("IQ4_NL", "IQ4_XS"), "no_imatrix_first_8th", "Q5_K"),
    ("ffn_down", ("Q5_K_M",), "more_bits", "Q6_K"),
    ("ffn_down", ("Q4_K_S",), "first_8th", "Q5_K"),
    ("ffn_down", ("Q4_0",), "imatrix_first_8th", "Q4_1"),
    ("ffn_down", ("Q5_0",), "imatrix_first_8th", "Q5_1"),
    ("attn_output", ("Q2_K",), "always", "Q3_K"),
    ("attn_output", ("Q3_K_M",), "always", "Q4_K"),
    ("attn_output", ("Q3_K_L",), "always", "Q5_K"),
)

#: ComfyUI-GGUF's img_tensor_get_type (tools/lcpp.patch): the older llama.cpp
#: rules it copies, applied to diffusion models (attn_v counted in order).
COMFY_RULES: Tuple[Row, ...] = (
    ("attn_v", ("Q2_K",), "always", "Q3_K"),
    ("attn_v", ("Q3_K_M",), "first_2", "Q5_K"),
    ("attn_v", ("Q3_K_M",), "always", "Q4_K"),
    ("attn_v", ("Q3_K_L",), "always", "Q5_K"),
    ("attn_v", ("Q4_K_M", "Q5_K_M"), "always", "Q6_K"),
    ("attn_v", ("Q4_K_S",), "first_4", "Q5_K"),
    ("attn_qkv", ("Q3_K_M", "Q3_K_L"), "always", "Q4_K"),
    ("attn_qkv", ("Q4_K_M",), "always", "Q5_K"),
    ("attn_qkv", ("Q5_K_M",), "always", "Q6_K"),
    ("ffn_down", ("Q3_K_M",), "always", "Q4_K"),
    ("ffn_down", ("Q3_K_L", "Q4_K_S"), "always", "Q5_K"),
    ("ffn_down", ("Q4_K_M", "Q5_K_M"), "always", "Q6_K"),
    ("ffn_down", ("Q4_0",), "always", "Q4_1"),
    ("ffn_down", ("Q5_0",), "always", "Q5_1"),
)


@dataclass(frozen=True)
class Position:
    """Where a tensor stands for the conditions: its index among its
    category's tensors, the layer count, the model's grouping, imatrix."""

    index: int = 0
    layers: int = 1
    gqa: int = 1
    imatrix: bool = False


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits (integer division as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def condition_holds(cond: str, p: Position) -> bool:
    i, n = p.index, p.layers
    if cond == "always":
        return True
    if cond == "more_bits":
        return use_more_bits(i, n)
    if cond == "first_8th":
        return i < n // 8
    if cond == "first_16th":
        return i < n // 16
    if cond == "first_2":
        return i < 2
    if cond == "first_4":
        return i < 4
    if cond == "gqa4":
        return p.gqa >= 4
    if cond == "no_imatrix_first_8th":
        return not p.imatrix and i < n // 8
    if cond == "imatrix_first_8th":
        return p.imatrix and i < n // 8
    raise ValueError(f"unknown preset condition {cond!r}")


def mix_type(rules: Sequence[Row], preset: str, category: Optional[str],
             p: Position) -> Tuple[str, Optional[str]]:
    """(type, the rule that chose it or None) of a tensor of `category`."""
    base = PRESETS.get(preset, preset)
    for cat, presets, cond, t in rules:
        if cat == category and preset in presets and condition_holds(cond, p):
            return t, f"{cat} under {preset} ({cond})"
    return base, None


def fallback(gtype: str, row: int) -> Tuple[str, Optional[str]]:
    """tensor_type_fallback: `gtype` if its block divides `row`, else the
    fallback type (F16 when that does not fit either), with the reason."""
    bs = BLOCK_SIZE.get(gtype)
    if not bs or row % bs == 0:
        return gtype, None
    alt = FALLBACK.get(gtype)
    if alt is None or row % BLOCK_SIZE[alt]:
        return "F16", f"row length {row} is not a multiple of {bs}: {gtype} impossible, F16"
    return alt, (f"row length {row} is not a multiple of {bs}: {gtype} impossible, {alt} "
                 "(llama.cpp's fallback)")


def llama_preset_type(preset: str, category: Optional[str], row: int, p: Position,
                      tied: bool) -> Tuple[str, str, bool]:
    """(type, reason, fell back) of one quantizable tensor of an LLM file
    under `preset`, as llama_tensor_get_type decides it. `category` is
    output / token_embd / attn_v / ffn_down / attn_output / None; `tied`:
    the model has no output.weight (token_embd is also the output)."""
    base = PRESETS[preset]
    if category == "output" or (tied and category == "token_embd"):
        what = "output" if category == "output" else "token_embd (tied to the output)"
        if row % BLOCK_SIZE[base]:
            return "Q8_0", f"{what}: row {row} not a multiple of {BLOCK_SIZE[base]}, Q8_0", False
        if base == "Q8_0":
            return "Q8_0", f"{what}: Q8_0", False
        t, why = "Q6_K", f"{what}: Q6_K under {preset}"
    else:
        t, rule = mix_type(LLAMA_RULES, preset, category, p)
        why = f"{rule}: {t}" if rule else f"{t} (base type of {preset})"
    fb, fb_why = fallback(t, row)
    if fb_why:
        return fb, f"{why}; {fb_why}", True
    return t, why, False
