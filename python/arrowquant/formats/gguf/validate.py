"""`arrowquant validate SOURCE FILE.gguf`: every tensor of a GGUF file
against the source tensor it came from.

The file's tensors are matched to the source by replaying the export's
plan (formats/gguf/arch.py) when the file is a llama.cpp file (llama.cpp
names, Q/K rows permuted), by name otherwise. The source values get the same
row permutation, then go through the same comparison as ArrowQuant's own
format: cosine, relative MSE, SQNR, max error.

Pass rules: a block type passes at the cosine threshold of its bit width
(Q8_0 -> 8, Q4_0 / Q4_1 -> 4: the largest threshold width not above the
type's bits per weight); F32 must be exact; F16 must be exact from a float16
source and otherwise within float16 rounding (half an ulp: |x| * 2^-11, or
2^-25 in the subnormal range)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from ...errors import FormatError, ShapeMismatchError

F16_MAX = 65504.0


def _threshold(bpw: float, thresholds: Dict[int, float]) -> Optional[float]:
    widths = [w for w in thresholds if w <= bpw + 1e-9]
    return thresholds[max(widths)] if widths else None


def validate_gguf(original: Any, path: Any, thresholds: Dict[int, float]):
    from ...engine.dtypes import to_float32
    from ...engine.metrics import ErrorSums
    from ...sources import open_model
    from ...validation import LayerCheck, ValidationReport
    from .export import dequantize_tensor, gguf_shape, read_header
    from .arch import load_config, plan_architecture
    from .plan import model_dir

    header = read_header(path)
    layers: List[Any] = []
    with open_model(original) as src:
        by_gguf: Dict[str, Any] = {}
        generated = set()
        root = model_dir(src)
        source_names = {t.name for t in src.tensors}
        renamed = not all(t["name"] in source_names for t in header["tensors"])
        if renamed:
            # A llama.cpp file: the names (and Q/K rows) are the export plan's.
            cfg = load_config(root)
            if cfg is None:
                raise FormatError(f"{path}: tensor names are not the source's and {root} has no "
                                  "config.json to map them")
            for t in plan_architecture(root, src.tensors, cfg=cfg).tensors:
                if t.name is None:
                    continue
                if t.source is None:
                    generated.add(t.name)
                else:
                    by_gguf[t.name] = t
        else:
            for info in src.tensors:
                by_gguf[info.name] = None
        for t in header["tensors"]:
            name = t["name"]
            if name in generated:
                continue  # made by the export (rope factors), not in the source
            if name not in by_gguf:
                raise FormatError(f"{path}: tensor {name!r} has no source tensor in {original}")
            plan = by_gguf[name]
            info = src.info(plan.source if plan is not None else name)
            want = tuple(gguf_shape(info.shape)[0])
            have = tuple(int(d) for d in reversed(t["dims"]))
            if want != have:
                raise ShapeMismatchError(f"{path}: tensor {name!r} has shape {list(have)}, the "
                                         f"source {info.name!r} {list(info.shape)}")
            x = to_float32(np.ascontiguousarray(src.read(info.name)), info.dtype)
            x = x.astype(np.float64).reshape(info.shape if info.shape else (1,))
            if plan is not None and plan.row_order is not None:
                x = x[plan.row_order]
            x = x.reshape(-1)
            y = dequantize_tensor(path, name).astype(np.float64).reshape(-1)
            err = x - y
            sums = ErrorSums(float(x @ x), float(y @ y), float(x @ y), float(err @ err),
                             float(np.abs(err).max()) if err.size else 0.0, int(x.size))
            m = sums.metrics()
            bpw = 8.0 * t["nbytes"] / max(t["numel"], 1)
            thr: Optional[float] = None
            if t["type"] == "F32" or (t["type"] == "F16" and info.dtype == "float16"):
                ok = bool(np.array_equal(x, y, equal_nan=True))  # kept: NaN stays NaN
            elif t["type"] == "F16":
                bound = np.maximum(np.abs(x) * 2.0 ** -11, 2.0 ** -25)
                ok = bool(np.all(np.abs(err) <= bound)) and bool(np.all(np.abs(x) <= F16_MAX))
            else:
                thr = _threshold(bpw, thresholds)
                ok = thr is not None and math.isfinite(m.cosine) and m.cosine >= thr
            layers.append(LayerCheck(name, t["type"], m.cosine, m.rel_mse, m.sqnr_db,
                                     m.max_abs_error, thr, ok))
        written = {t["name"] for t in header["tensors"]}
        missing = [n for n, p in by_gguf.items() if n not in written and
                   (p is not None or (src.info(n).is_float and src.info(n).numel > 0))]
        if missing:
            raise FormatError(f"{path}: tensor {missing[0]!r} of {original} is missing")
    return ValidationReport(str(original), str(path), layers)
