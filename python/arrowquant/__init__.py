"""ArrowQuant: group-wise INT2/INT4/INT8 weight quantization with a C++20 engine.

The quantize path, from the top: cli.py -> api.quantize -> pipeline
(StreamingQuantizer) -> arrowquant._core.quantize (cpp/src/python) ->
arrowquant::Quantize (cpp/src/quantize.cc) -> per-row kernels
(cpp/src/kernels/scalar.cc, avx2.cc). docs/ARCHITECTURE.md has the map.

Importing arrowquant never imports torch; arrowquant.torch does.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import QuantizeSummary, dequantize, inspect, load, quantize, validate
from .calibrated import CalibratedPlanner, apply_calibration
from .calibration import CalibrationStats, calibrate, load_stats
from .config import DiffusionQuantConfig
from .config import resolve as resolve_config
from .diffusion import DiffusionPlanner
from .engine import active_kernel, dequantize_array, quantize_array
from .gguf_export import export_gguf
from .importance import equalization_scales, plan_equalization, quantize_weighted
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
from .metrics import MarkovMetrics, get_markov_metrics
from .modality import ModalityDecision, detect_modality
from .plan import RulePlanner, TensorInfo, TensorPlan
from .tensor import ErrorMetrics, QuantizedTensor

__all__ = [
    "__version__",
    # model files
    "quantize", "load", "inspect", "validate", "dequantize", "QuantizeSummary", "export_gguf",
    # in-memory tensors
    "quantize_array", "dequantize_array", "active_kernel", "QuantizedTensor", "ErrorMetrics",
    # configuration and planning
    "DiffusionQuantConfig", "resolve_config", "DiffusionPlanner", "RulePlanner", "TensorInfo",
    "TensorPlan", "ModalityDecision", "detect_modality", "MarkovMetrics", "get_markov_metrics",
    # calibration (needs torch to record; not to use)
    "calibrate", "load_stats", "CalibrationStats", "CalibratedPlanner", "apply_calibration",
    "quantize_weighted", "plan_equalization", "equalization_scales",
    # errors
    "ArrowQuantError", "ArrowQuantIOError", "CancelledError", "ConfigurationError", "FormatError",
    "MemoryBudgetError", "MetadataError", "ModelNotFoundError", "QuantizationError",
    "ShapeMismatchError", "ValidationError",
]
