"""Element types: canonical names, sizes, SafeTensors codes, numpy types and
the exact conversion to float32. The one table every reader, writer and the
engine share."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..errors import ValidationError

#: dtypes the quantizer accepts, with their element size in bytes.
QUANTIZABLE_DTYPES: Dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
#: Every dtype a model file may hold, with its element size.
ITEMSIZE: Dict[str, int] = {**QUANTIZABLE_DTYPES, "float64": 8, "int64": 8, "int32": 4,
                            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
#: Canonical dtype name -> SafeTensors dtype code.
SAFETENSORS_CODES: Dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_CODE_TO_NAME = {code: name for name, code in SAFETENSORS_CODES.items()}
#: Unquantized dtypes numpy holds natively; bfloat16 / float8 read back as float32 (exact).
NATIVE_DTYPES: Dict[str, Any] = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
_ALIASES = {
    "f32": "float32", "float": "float32", "F32": "float32",
    "f16": "float16", "half": "float16", "F16": "float16",
    "bf16": "bfloat16", "BF16": "bfloat16",
    "float8_e4m3": "float8_e4m3fn", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def canonical_dtype(name: str) -> str:
    """Canonical name of a quantizable dtype (aliases accepted), or ValidationError."""
    name = _ALIASES.get(name, name)
    if name not in QUANTIZABLE_DTYPES:
        raise ValidationError(
            f"dtype {name!r} cannot be quantized; expected one of {', '.join(QUANTIZABLE_DTYPES)}"
        )
    return name


def safetensors_dtype(dtype: str) -> str:
    """Canonical name of a dtype given by name or by SafeTensors code."""
    if dtype in SAFETENSORS_CODES:
        return dtype
    if dtype in _CODE_TO_NAME:
        return _CODE_TO_NAME[dtype]
    raise ValidationError(
        f"unsupported dtype {dtype!r}; expected one of {', '.join(SAFETENSORS_CODES)} "
        f"(or the SafeTensors codes {', '.join(_CODE_TO_NAME)})"
    )


def readback_dtype(dtype: str) -> str:
    """The dtype an unquantized tensor of `dtype` is read back as."""
    return dtype if dtype in NATIVE_DTYPES else "float32"


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact conversion of raw little-endian bytes of `dtype` to float32."""
    raw = raw.view(np.uint8)
    if dtype == "float32":
        return raw.view(np.float32)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    import ml_dtypes

    if dtype == "float8_e4m3fn":
        return raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if dtype == "float8_e5m2":
        return raw.view(ml_dtypes.float8_e5m2).astype(np.float32)
    raise ValidationError(f"dtype {dtype!r} cannot be quantized")


def raw_to_array(raw: np.ndarray, dtype: str, shape: Any) -> np.ndarray:
    """Raw bytes of an unquantized tensor as a numpy array of its readback dtype."""
    if dtype in NATIVE_DTYPES:
        return raw.view(NATIVE_DTYPES[dtype]).reshape(shape)
    return to_float32(raw, dtype).reshape(shape)


def to_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Any dtype a model holds, as float64 (for comparisons)."""
    if dtype in QUANTIZABLE_DTYPES:
        return to_float32(np.ascontiguousarray(raw), dtype).astype(np.float64)
    return raw.view(NATIVE_DTYPES[dtype]).astype(np.float64)
