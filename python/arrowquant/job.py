"""A Job: one quantize run, decided once. The CLI, the Python API and the
first version's API all build one (profile < config file < environment <
flags, as config.resolve does) and hand it, unchanged, to the runner
(run/runner.py), which gives each tensor a TensorPlan whose QuantSpec the
engine receives."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from .config import DiffusionQuantConfig
from .errors import ConfigurationError
from .sizes import parse_size
from .spec import QuantSpec

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024 * 1024
DEFAULT_SHARD_SIZE = 2 * 1024 * 1024 * 1024
OUTPUT_FORMATS = ("parquet", "gguf")
ENGINES = ("native", "reference")
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """Everything a quantize run needs to know before it starts.

    `config` carries the spec (bit_width, group_size, scheme, method,
    param_dtype) and the per-layer policy (rules, mixed precision, fallback
    floors); the rest says where the run reads and writes and within which
    memory. `planner` replaces the diffusion-aware planner the runner makes
    from `config` (for callers with their own rules)."""

    input: Path
    output: Path
    config: DiffusionQuantConfig = field(default_factory=DiffusionQuantConfig)
    output_format: str = "parquet"
    max_memory: int = DEFAULT_MAX_MEMORY
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    engine: str = "native"
    overwrite: bool = False
    resume: bool = False
    calibration: Any = None              # statistics file path or CalibrationStats
    planner: Any = None                  # a planning.plan.Planner, or None
    gguf_type: Optional[str] = None
    gguf_arch: str = "auto"              # "auto": llama.cpp's layout; "generic": source names
    gguf_layout: Optional[str] = None    # diffusion models: "sdcpp" or "comfy" (None: by input)
    # Extra fields recorded with the settings (the first version's API adds its own).
    record_extra: Dict[str, Any] = field(default_factory=dict)
    # Where the chunks are quantized: this machine, or a Ray cluster
    # (run/ray_executor.py, docs/ray.md). Never part of the settings: the
    # output is the same bytes either way.
    executor: str = "local"
    ray_address: Optional[str] = None    # None: RAY_ADDRESS, else a local cluster; "auto"
    ray_cpus_per_task: int = 0           # 0: the engine's thread count (0 = a whole node)
    on_unit: Optional[Callable[[Dict[str, Any]], None]] = None  # Ray: each finished work unit

    def __post_init__(self) -> None:
        self.config.validate()
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigurationError(
                f"output format must be 'parquet' or 'gguf', got {self.output_format!r}")
        if self.engine not in ENGINES:
            raise ConfigurationError(f"engine must be 'native' or 'reference', got {self.engine!r}")
        if self.executor not in EXECUTORS:
            raise ConfigurationError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "ray" and self.output_format != "parquet":
            raise ConfigurationError("--executor ray writes ArrowQuant Parquet V2; GGUF output "
                                     "runs on one machine")
        if self.ray_cpus_per_task < 0:
            raise ConfigurationError(f"--ray-cpus-per-task must be >= 0, got "
                                     f"{self.ray_cpus_per_task}")
        if self.overwrite and self.resume:
            raise ConfigurationError("--overwrite and --resume exclude each other")

    @property
    def spec(self) -> QuantSpec:
        """The default spec of the run's tensors (rules may change it per tensor)."""
        c = self.config
        return QuantSpec(c.bit_width, c.group_size, c.scheme, c.method, c.param_dtype)

    @property
    def threads(self) -> int:
        return self.config.num_threads

    def replace(self, **changes: Any) -> "Job":
        return dataclasses.replace(self, **changes)


def build_job(input: PathLike, output: PathLike, *, config: Optional[DiffusionQuantConfig] = None,
              max_memory: Union[None, str, int] = None, chunk_size: Union[str, int] = DEFAULT_CHUNK_SIZE,
              shard_size: Union[str, int] = DEFAULT_SHARD_SIZE, **options: Any) -> Job:
    """A Job from a resolved config and run options. `max_memory` None means:
    the config's max_memory_limit_mb when set (profile, file, environment),
    else 256 MiB; an explicit value always wins (it is a flag)."""
    cfg = config if config is not None else DiffusionQuantConfig()
    if max_memory is None:
        budget = cfg.max_memory_limit_mb * 1024 * 1024 if cfg.max_memory_limit_mb \
            else DEFAULT_MAX_MEMORY
    else:
        budget = parse_size(max_memory, "max memory")
    return Job(input=Path(input), output=Path(output), config=cfg, max_memory=budget,
               chunk_size=parse_size(chunk_size, "chunk size"),
               shard_size=parse_size(shard_size, "shard size"), **options)
