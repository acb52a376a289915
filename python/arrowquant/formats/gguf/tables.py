"""The GGUF types the writer makes: their names, block sizes, bytes and error
bounds, and the type that --bits / --scheme / --gguf-type name."""

from __future__ import annotations

from typing import Optional

from ...errors import ConfigurationError

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "IQ4_XS", "F16", "F32")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ4_NL", "IQ4_XS")
BLOCK_SIZE = 32
#: llama.cpp preset names that are not also type names: per-tensor type
#: mixes (formats/gguf/presets.py; the LLM files follow llama.cpp's rules,
#: the diffusion layouts their families' K-mix rules). Q2_K, Q6_K, Q8_0 and
#: IQ4_XS are presets too when given as --gguf-type (presets.MIX_PRESETS).
GGUF_PRESETS = ("Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")
#: Values per block of each block type (K-quants and IQ4_XS: super-blocks of 256).
BLOCK_SIZES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32,
               "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
#: Bytes per block (BLOCK_SIZES values; or per element for F16/F32).
TYPE_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "IQ4_NL": 18,
              "Q2_K": 84, "Q3_K": 110,
              "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "IQ4_XS": 136, "F16": 2, "F32": 4}
#: Worst-case absolute error of one value, as a fraction of its block's
#: max |x| (Q8_0, Q4_0) or range (Q4_1); the f16 rounding of the block
#: parameters adds up to 2^-11 relative on top.
ERROR_BOUND = {"Q8_0": 0.5 / 127, "Q4_0": 1.0 / 8, "Q4_1": 0.5 / 15}


def choose_type(bits: int = 4, scheme: str = "symmetric", gguf_type: Optional[str] = None) -> str:
    """The GGUF type for weight matrices from bits / scheme / an override."""
    if gguf_type is not None:
        t = str(gguf_type).upper()
        if t not in GGUF_TYPES + GGUF_PRESETS:
            raise ConfigurationError(
                f"GGUF type must be one of {', '.join(GGUF_TYPES + GGUF_PRESETS)}, got "
                f"{gguf_type!r}")
        return t
    if scheme not in ("symmetric", "asymmetric"):
        raise ConfigurationError(f"scheme must be 'symmetric' or 'asymmetric', got {scheme!r}")
    if bits == 8:
        return "Q8_0"
    if bits == 4:
        return "Q4_0" if scheme == "symmetric" else "Q4_1"
    raise ConfigurationError(
        f"GGUF export has no {bits}-bit type; use bits 4 or 8, or gguf_type="
        f"{'/'.join(GGUF_TYPES)}")


def type_bytes(gtype: str, numel: int) -> int:
    if gtype in BLOCK_TYPES:
        return numel // BLOCK_SIZES[gtype] * TYPE_BYTES[gtype]
    return numel * TYPE_BYTES[gtype]
