"""The first version's import name. Code written for it keeps working:

    from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
    ArrowQuantV2(mode="diffusion").quantize_diffusion_model("model/", "model-int4/")

Everything here is arrowquant underneath (see docs/migration.md)."""

from __future__ import annotations

from arrowquant import __version__
from ._v1 import (
    ArrowQuantV2,
    AsyncArrowQuantV2,
    ShardedSafeTensorsLoader,
    load_sharded_safetensors,
    quantize_diffusion_model,
)
from arrowquant.config import DiffusionQuantConfig
from arrowquant.errors import (
    ArrowQuantError,
    CancelledError,
    ConfigurationError,
    FormatError,
    MetadataError,
    ModelNotFoundError,
    QuantizationError,
    ShapeMismatchError,
    ValidationError,
)

__all__ = [
    "__version__",
    "ArrowQuantV2",
    "AsyncArrowQuantV2",
    "DiffusionQuantConfig",
    "ShardedSafeTensorsLoader",
    "quantize_diffusion_model",
    "load_sharded_safetensors",
    "ArrowQuantError",
    "QuantizationError",
    "ConfigurationError",
    "ValidationError",
    "ModelNotFoundError",
    "MetadataError",
    "ShapeMismatchError",
    "FormatError",
    "CancelledError",
]
