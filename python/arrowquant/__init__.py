"""ArrowQuant: group-wise INT2/INT4/INT8 weight quantization with a C++20 engine.

The quantize path, from the top: cli.py -> api.quantize -> pipeline ->
engine.quantize_array -> arrowquant._core.quantize (cpp/src/python) ->
arrowquant::Quantize (cpp/src/quantize.cc) -> per-row kernels
(cpp/src/kernels/scalar.cc, avx2.cc)."""

from __future__ import annotations

from .engine import active_kernel, dequantize_array, quantize_array
from .errors import (
    ArrowQuantError,
    ArrowQuantIOError,
    CancelledError,
    ConfigurationError,
    FormatError,
    MemoryBudgetError,
    MetadataError,
    ModelNotFoundError,
    QuantizationError,
    ShapeMismatchError,
    ValidationError,
)
from .tensor import ErrorMetrics, QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "quantize_array",
    "dequantize_array",
    "active_kernel",
    "QuantizedTensor",
    "ErrorMetrics",
    "ArrowQuantError",
    "ArrowQuantIOError",
    "CancelledError",
    "ConfigurationError",
    "FormatError",
    "MemoryBudgetError",
    "MetadataError",
    "ModelNotFoundError",
    "QuantizationError",
    "ShapeMismatchError",
    "ValidationError",
]

from .api import QuantizeSummary, dequantize, inspect, load, quantize, validate  # noqa: E402

__all__ += ["quantize", "load", "inspect", "validate", "dequantize", "QuantizeSummary"]

from .config import DiffusionQuantConfig  # noqa: E402
from .config import resolve as resolve_config  # noqa: E402
from .diffusion import DiffusionPlanner  # noqa: E402
from .metrics import MarkovMetrics, get_markov_metrics  # noqa: E402
from .modality import ModalityDecision, detect_modality  # noqa: E402
from .plan import RulePlanner, TensorInfo, TensorPlan  # noqa: E402

__all__ += ["DiffusionQuantConfig", "resolve_config", "DiffusionPlanner", "MarkovMetrics",
            "get_markov_metrics", "ModalityDecision", "detect_modality", "RulePlanner",
            "TensorInfo", "TensorPlan"]
