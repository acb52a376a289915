"""Per-tensor GGUF type choice for llama.cpp files, behind one small interface.

A type rule is a callable ``rule(tensor: GgufTensor) -> TypeChoice``. It sees
the tensor's llama.cpp role (``tensor.kind``, a gguf ``MODEL_TENSOR``), layer
(``tensor.block``), written shape, source dtype and ``f32_reason`` (set when
llama.cpp needs F32), and returns the type with its reason. Presets
(Q4_K_M, ...) and measured mixtures are rules of this shape; the writer only
asks for the type name it then encodes.

:class:`UniformType` is today's rule: one target type for every weight
matrix, F32 where llama.cpp needs it, and a lossless wider type when a row
is not a whole number of the type's blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .arch import GgufTensor


@dataclass(frozen=True)
class TypeChoice:
    type: str           # GGML type name ("Q8_0", "F16", ...)
    reason: str
    fallback: bool      # stored wider than the rule's target


TypeRule = Callable[[GgufTensor], TypeChoice]


def block_size(type_name: str) -> int:
    """Elements per block of a GGML type (1 for F16 / F32), from gguf's table."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def lossless_wide(dtype: str) -> str:
    """The narrowest GGUF float type that holds every value of `dtype`."""
    return "F16" if dtype == "float16" else "F32"


@dataclass(frozen=True)
class UniformType:
    """`target` for every tensor llama.cpp lets be quantized."""

    target: str

    def __call__(self, t: GgufTensor) -> TypeChoice:
        if t.f32_reason:
            return TypeChoice("F32", t.f32_reason, self.target != "F32")
        rows = int(t.shape[-1])
        bs = block_size(self.target)
        if bs > 1 and rows % bs:
            wide = lossless_wide(t.dtype)
            return TypeChoice(wide, f"row length {rows} is not a multiple of {bs}: {self.target} "
                                    f"impossible, stored as {wide} (lossless from {t.dtype})", True)
        return TypeChoice(self.target, f"{self.target} for every weight matrix", False)


def choose(rule: TypeRule, t: GgufTensor) -> TypeChoice:
    """Applies `rule`, checking what it returns (a rule from outside must not
    make a file llama.cpp refuses)."""
    c = rule(t)
    if t.f32_reason and c.type != "F32":
        from ...errors import ConfigurationError

        raise ConfigurationError(f"type rule gave {c.type} to {t.name!r}, which llama.cpp needs in "
                                 f"F32 ({t.f32_reason})")
    bs = block_size(c.type)
    if bs > 1 and int(t.shape[-1]) % bs:
        from ...errors import ConfigurationError

        raise ConfigurationError(f"type rule gave {c.type} to {t.name!r}, whose rows of "
                                 f"{t.shape[-1]} are not a multiple of {bs}")
    return c




def llama_category(name: str) -> Optional[str]:
    """llama.cpp's tensor_get_category for the categories its preset rules
    use (matched on the llama.cpp tensor name, as llama.cpp does)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", None),
                     ("attn_q.weight", None), ("attn_output.weight", "attn_output"),
                     ("ffn_up", None), ("ffn_gate", None), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return None


@dataclass(frozen=True)
class LlamaPreset:
    """llama.cpp's preset `preset` (Q4_K_M, IQ4_XS, ...): the type of each
    tensor as ``llama_model_quantize`` chooses it (formats/gguf/presets.py).
    `layers` is the model's block count, `gqa` query heads per key/value
    head, `tied` True when the file has no output.weight (token_embd is the
    output), `imatrix` True when importance statistics weight the search.
    Where llama.cpp's last resort is F16, a float32 source is kept F32
    (lossless) instead."""

    preset: str
    layers: int
    gqa: int = 1
    tied: bool = False
    imatrix: bool = False

    def __call__(self, t: GgufTensor) -> TypeChoice:
        from .presets import Position, llama_preset_type

        if t.f32_reason:
            return TypeChoice("F32", t.f32_reason, True)
        cat = llama_category(t.name or "")
        index = t.block if t.block is not None else 0
        pos = Position(index=index, layers=max(1, self.layers), gqa=self.gqa,
                       imatrix=self.imatrix)
        gtype, reason, fell = llama_preset_type(self.preset, cat, int(t.shape[-1]), pos, self.tied)
        if gtype == "F16":
            gtype = lossless_wide(t.dtype)
            reason += f" ({gtype}: lossless from {t.dtype})"
        return TypeChoice(gtype, reason, fell)


def llama_preset_rule(preset: str, cfg: dict, tensors: Sequence[GgufTensor],
                      imatrix: bool = False) -> LlamaPreset:
    """The LlamaPreset of a model from its config.json and planned tensors."""
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
    heads = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or heads
    tied = not any(t.name == "output.weight" for t in tensors)
    return LlamaPreset(preset=preset, layers=layers, gqa=max(1, int(heads) // max(1, int(kv))),
                       tied=tied, imatrix=imatrix)
