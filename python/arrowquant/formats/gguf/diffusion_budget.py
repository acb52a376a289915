"""`--target-bpw` and `--calibration` for the diffusion GGUF layouts.

The same measured-error allocation as the LLM path (allocate.py: each free
tensor's candidate types measured with the engine's own encoder on sampled
rows, greedy along each tensor's convex hull of (bytes, error) under the
bit budget), on the tensors as the file writes them. Free tensors are those
the layout's rules leave to the target type (rules ``target`` and
``comfy-mix``); 1-D, kept, timestep / adaLN (Q8_0 or wider) and fallback
tensors stay as their rules decided and count with their real bytes.
Calibration statistics give each unfused tensor a per-column importance
(the mean squared input of its columns, collected across denoising
timesteps), which weights both the measurement and the writer's block
search."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .allocate import SAMPLE_ROWS, SAMPLE_RUNS, Importance, allocate_bpw
from .diffusion_inputs import OutTensor
from .diffusion_types import BLOCK_SIZE, TypeDecision
from .types import TypeChoice

#: Rules whose tensors --target-bpw may give another type.
FREE_RULES = ("target", "comfy-mix")

Planned = Tuple[OutTensor, Tuple[int, ...], TypeDecision, Optional[str]]


def sample_rows(t: OutTensor, wshape: Sequence[int]) -> np.ndarray:
    """float32 rows of the written shape (row length wshape[-1]): up to
    SAMPLE_ROWS of them, taken in SAMPLE_RUNS runs spread over the tensor's
    parts (a fused tensor samples each of its sources)."""
    from ...engine.dtypes import to_float32

    row = int(wshape[-1])
    src = t.component.open()
    per_part = max(1, SAMPLE_ROWS // max(1, len(t.parts)))
    out: List[np.ndarray] = []
    for part in t.parts:
        info = src.info(part.source)
        cols = max(1, info.cols)
        # Runs of source rows that hold whole written rows: multiples of step.
        step = row // math.gcd(row, cols)
        rows = min(max(step, per_part * row // cols), part.row_count) // step * step
        if rows <= 0:
            continue
        runs = max(1, min(SAMPLE_RUNS, rows // step))
        run = max(step, rows // runs // step * step)
        for s in np.linspace(part.row_start, part.row_start + part.row_count - run, runs):
            raw = np.asarray(src.read(part.source, int(s), run))
            out.append(to_float32(raw, info.dtype).reshape(-1, row))
    if not out:  # a tensor smaller than one run: all of it
        return np.zeros((0, row), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def importance_of(calibration: Any) -> Optional[Callable[[OutTensor, Sequence[int]], Optional[np.ndarray]]]:
    """Per-column importance of an unfused, unreshaped written tensor from
    calibration statistics (allocate.importance_from_calibration), or None."""
    from .allocate import importance_from_calibration

    base = importance_from_calibration(calibration)
    if base is None:
        return None

    def importance(t: OutTensor, wshape: Sequence[int]) -> Optional[np.ndarray]:
        if len(t.parts) != 1 or tuple(wshape) != tuple(t.shape) or len(t.shape) != 2:
            return None  # fused or rearranged: its columns are not the layer's inputs
        return base(SimpleNamespace(source=t.source_names[0], shape=t.shape))

    return importance


def allocate(plan: Sequence[Planned], target_bpw: float,
             importance: Optional[Callable[[OutTensor, Sequence[int]], Optional[np.ndarray]]],
             threads: int = 0) -> Tuple[List[Planned], Dict[str, Any]]:
    """`plan` with the free tensors' types chosen under `target_bpw` bits per
    weight over the whole file; the summary of allocate_bpw."""
    proxies, fixed, free_names = [], {}, set()
    weights: Dict[str, Optional[np.ndarray]] = {}
    for t, wshape, d, _ in plan:
        free = d.rule in FREE_RULES and d.gguf_type in BLOCK_SIZE and len(wshape) >= 2
        data = sample_rows(t, wshape) if free else None
        if free and data is not None and data.shape[0] == 0:
            free = False
        proxies.append(SimpleNamespace(name=t.name, shape=tuple(int(x) for x in wshape),
                                       data=data, source=None))
        if free:
            free_names.add(t.name)
            weights[t.name] = importance(t, wshape) if importance is not None else None
        else:
            fixed[t.name] = TypeChoice(d.gguf_type, d.reason, d.fallback)

    imp: Optional[Importance] = (lambda p: weights.get(p.name)) if importance is not None else None
    choices, summary = allocate_bpw(None, proxies, target_bpw,
                                    fixed=lambda p: fixed.get(p.name), importance=imp,
                                    threads=threads)
    out: List[Planned] = []
    for t, wshape, d, note in plan:
        c = choices.get(t.name)
        out.append((t, wshape, TypeDecision(c.type, "target-bpw", c.reason) if c else d, note))
    return out, summary
