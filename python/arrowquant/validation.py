"""Validation of a quantized model against its original: one LayerCheck per
tensor and the ValidationReport the CLI prints or writes (.json / .md)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .config import DEFAULT_MIN_COSINE
from .engine.dtypes import to_float64
from .engine.metrics import ErrorSums
from .errors import ArrowQuantError, ArrowQuantIOError, FormatError, ShapeMismatchError
from .formats.v2_reader import open_v2
from .sources import open_model

PathLike = Union[str, os.PathLike]


@dataclass
class LayerCheck:
    name: str
    quant_type: str
    cosine: float
    rel_mse: float
    sqnr_db: float
    max_abs_error: float
    threshold: Optional[float]
    passed: bool


@dataclass
class ValidationReport:
    original: str
    quantized: str
    layers: List[LayerCheck]

    @property
    def passed(self) -> bool:
        return all(l.passed for l in self.layers)

    @property
    def mean_cosine(self) -> float:
        return float(np.mean([l.cosine for l in self.layers])) if self.layers else 1.0

    def as_dict(self) -> Dict[str, Any]:
        def clean(v: Any) -> Any:
            return v if not isinstance(v, float) or math.isfinite(v) else str(v)

        return {"original": self.original, "quantized": self.quantized, "passed": self.passed,
                "mean_cosine": self.mean_cosine,
                "failed": [l.name for l in self.layers if not l.passed],
                "layers": [{k: clean(v) for k, v in dataclasses.asdict(l).items()}
                           for l in self.layers]}

    def to_markdown(self) -> str:
        lines = [f"# Validation: {self.quantized}", "",
                 f"Original: `{self.original}`  ",
                 f"Result: **{'PASS' if self.passed else 'FAIL'}**, mean cosine "
                 f"{self.mean_cosine:.6f}, {sum(not l.passed for l in self.layers)} layer(s) failed",
                 "", "| layer | type | cosine | rel. MSE | SQNR dB | max abs err | threshold | ok |",
                 "|---|---|---|---|---|---|---|---|"]
        for l in self.layers:
            thr = "" if l.threshold is None else f"{l.threshold:.2f}"
            lines.append(f"| {l.name} | {l.quant_type} | {l.cosine:.6f} | {l.rel_mse:.3e} | "
                         f"{l.sqnr_db:.2f} | {l.max_abs_error:.3e} | {thr} | "
                         f"{'yes' if l.passed else 'NO'} |")
        return "\n".join(lines) + "\n"

    def save(self, path: PathLike) -> Path:
        """Writes the report (.md / .markdown: Markdown, else JSON) atomically;
        never over, or inside, the models it compares."""
        import json

        from .files import atomic_write_text, check_separate

        out = Path(path)
        for model in (self.original, self.quantized):
            check_separate(Path(model), out)
        if not out.parent.is_dir():
            raise ArrowQuantError(f"{out.parent}: the report's directory does not exist")
        text = self.to_markdown() if out.suffix.lower() in (".md", ".markdown") \
            else json.dumps(self.as_dict(), indent=2)
        try:
            atomic_write_text(out, text)
        except OSError as exc:
            raise ArrowQuantIOError(f"{out}: cannot write the report ({exc.strerror or exc})") \
                from None
        return out


def validate_v2(original: PathLike, quantized: PathLike,
                thresholds: Optional[Dict[int, float]] = None) -> ValidationReport:
    """Compares every tensor of an ArrowQuant V2 model with its original, one
    tensor at a time: cosine, relative MSE, SQNR, max error, and pass/fail
    against the cosine threshold of its bit width (unquantized: exact)."""
    thresholds = dict(thresholds or DEFAULT_MIN_COSINE)
    model = open_v2(quantized)
    layers: List[LayerCheck] = []
    with open_model(original) as source:
        names = {t.name for t in source.tensors}
        missing = [n for n in model.entries if n not in names]
        if missing:
            raise FormatError(f"{quantized}: tensor {missing[0]!r} is not in {original}")
        for t in source.tensors:
            if t.name not in model.entries:
                raise FormatError(f"{quantized}: tensor {t.name!r} of the original is missing")
            e = model.info(t.name)
            if tuple(e.shape) != tuple(t.shape):
                raise ShapeMismatchError(f"{quantized}: tensor {t.name!r} has shape {list(e.shape)}, "
                                         f"the original {list(t.shape)}")
            x = to_float64(source.read(t.name), t.dtype).reshape(-1)
            y = model.dequantize(t.name, out_dtype=np.float64).reshape(-1)
            if not e.bits and np.array_equal(x, y, equal_nan=True):
                # Kept exactly (NaN where the original has NaN): exact by definition.
                layers.append(LayerCheck(t.name, e.quant_type, 1.0, 0.0, math.inf, 0.0, None,
                                         True))
                continue
            m = ErrorSums.of(x, y).metrics()
            thr = thresholds.get(e.bits) if e.bits else None
            ok = (m.cosine >= thr) if thr is not None else bool(np.array_equal(x, y))
            layers.append(LayerCheck(t.name, e.quant_type, m.cosine, m.rel_mse, m.sqnr_db,
                                     m.max_abs_error, thr, ok))
    return ValidationReport(str(original), str(quantized), layers)
