"""ArrowQuant: group-wise INT2/INT4/INT8 weight quantization with a C++20 engine.

The quantize path, from the top (docs/ARCHITECTURE.md has the map):
cli.py -> api.quantize (one Job) -> run.runner -> sources (read) ->
planning (a TensorPlan per tensor) -> run.streaming -> engine.chunk ->
arrowquant._core (cpp/src/python) -> arrowquant::Quantize (cpp/src/quantize.cc)
-> per-row kernels (cpp/src/kernels) -> formats.v2_writer.

Importing arrowquant never imports torch; arrowquant.torch does.
"""

from __future__ import annotations

from .version import __version__

from .api import QuantizeSummary, dequantize, inspect, load, quantize, run_job, validate
from .calibration import CalibrationStats, calibrate, load_stats
from .config import DiffusionQuantConfig
from .config import resolve as resolve_config
from .engine import active_kernel, dequantize_array, quantize_array
from .engine.metrics import ErrorMetrics, MarkovMetrics, get_markov_metrics
from .engine.tensor import QuantizedTensor
from .engine.weighted import equalization_scales, plan_equalization, quantize_weighted
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
from .formats.gguf.export import export_gguf
from .job import Job, build_job
from .planning.calibrated import CalibratedPlanner, apply_calibration
from .planning.diffusion import DiffusionPlanner
from .planning.plan import RulePlanner, TensorPlan
from .sources import TensorInfo
from .sources.modality import ModalityDecision, detect_modality
from .spec import QuantSpec

__all__ = [
    "__version__",
    # model files
    "quantize", "load", "inspect", "validate", "dequantize", "QuantizeSummary", "export_gguf",
    "Job", "build_job", "run_job",
    # in-memory tensors
    "quantize_array", "dequantize_array", "active_kernel", "QuantizedTensor", "ErrorMetrics",
    "QuantSpec",
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
