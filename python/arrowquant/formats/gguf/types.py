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
from typing import Callable

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


