"""Per-tensor GGUF types chosen by the user's patterns and by a bit budget.

* :class:`OverrideRule` puts ``--keep PATTERN`` (the source's float type,
  lossless) and ``--bits-for PATTERN=BITS`` (2 -> Q2_K, 4 -> Q4_K, 8 -> Q8_0,
  16 -> lossless float; llama.cpp's fallback when the row does not fit) in
  front of another rule. Patterns match the source name or the llama.cpp
  name (shell-style, or ``re:REGEX``), first match wins, keep before bits.
* :func:`allocate_bpw` (``--target-bpw X``) measures, for every tensor the
  other rules leave free, the error of each candidate type on a sample of
  its rows (the engine's own encoder, importance-weighted when calibration
  statistics are given), and picks the types with the least total error
  whose bytes fit ``X`` bits per weight over the whole file (every tensor
  counted, F32 norms included): greedy steps along each tensor's lower
  convex hull of (bytes, error), the step with the largest error drop per
  byte first. Each tensor's reason gives its measured SQNR and the step it
  did not take.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ...errors import ConfigurationError
from .arch import GgufTensor
from .presets import BLOCK_SIZE, BPW, fallback
from .types import TypeChoice, TypeRule, lossless_wide

#: The GGUF type of each --bits-for width.
BITS_TYPE = {2: "Q2_K", 4: "Q4_K", 8: "Q8_0"}
#: Candidates of --target-bpw: rows of a multiple of 256, and the others.
CANDIDATES_256 = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
CANDIDATES_32 = ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: Rows of each tensor the error is measured on (evenly spread runs).
SAMPLE_ROWS = 256
SAMPLE_RUNS = 8

Importance = Callable[[GgufTensor], Optional[np.ndarray]]


def _match(patterns: Sequence[str], t: GgufTensor) -> Optional[str]:
    from ...planning.rules import match_pattern

    for p in patterns:
        for name in (t.source, t.name):
            if name and match_pattern(p, name):
                return p
    return None


@dataclass(frozen=True)
class OverrideRule:
    """--keep and --bits-for in front of `base`."""

    base: TypeRule
    keep: Tuple[str, ...] = ()
    bits_for: Tuple[Tuple[str, int], ...] = ()

    def pinned(self, t: GgufTensor) -> Optional[TypeChoice]:
        """The choice a pattern makes for `t`, or None."""
        if t.f32_reason:
            return None
        p = _match(self.keep, t)
        if p is not None:
            wide = lossless_wide(t.dtype)
            return TypeChoice(wide, f"--keep {p}: kept unquantized ({wide}, lossless from "
                                    f"{t.dtype})", False)
        for pattern, bits in self.bits_for:
            if _match((pattern,), t) is None:
                continue
            if bits >= 16:
                wide = lossless_wide(t.dtype)
                return TypeChoice(wide, f"--bits-for {pattern}={bits}: {wide} (lossless)", False)
            want = BITS_TYPE[bits]
            got, why = fallback(want, int(t.shape[-1]))
            if got == "F16":
                got = lossless_wide(t.dtype)
            reason = f"--bits-for {pattern}={bits}: {want}" + (f"; {why}" if why else "")
            return TypeChoice(got, reason, got != want)
        return None

    def __call__(self, t: GgufTensor) -> TypeChoice:
        return self.pinned(t) or self.base(t)


def check_bits_for(bits_for: Mapping[str, int]) -> Tuple[Tuple[str, int], ...]:
    out = []
    for p, b in bits_for.items():
        if int(b) not in BITS_TYPE and int(b) < 16:
            raise ConfigurationError(f"--bits-for {p}={b}: GGUF output takes 2, 4, 8 or 16 bits")
        out.append((str(p), int(b)))
    return tuple(out)


@dataclass
class Candidate:
    type: str
    bytes: int
    err: float      # estimated (weighted) squared error over the whole tensor
    sqnr_db: float


def _type_bytes(gtype: str, numel: int) -> int:
    from .tables import type_bytes

    return type_bytes(gtype, numel)


def _sample(src: Any, t: GgufTensor) -> np.ndarray:
    """float32 rows (n, cols) of `t`: up to SAMPLE_ROWS in SAMPLE_RUNS runs."""
    from ...engine.dtypes import to_float32

    if t.data is not None:
        return np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[-1]))
    info = src.info(t.source)
    rows, cols = info.rows, info.cols
    if rows <= SAMPLE_ROWS:
        starts, run = [0], rows
    else:
        run = SAMPLE_ROWS // SAMPLE_RUNS
        starts = [int(s) for s in np.linspace(0, rows - run, SAMPLE_RUNS)]
    parts = [to_float32(np.asarray(src.read(t.source, s, run)), info.dtype).reshape(run, cols)
             for s in starts]
    x = np.concatenate(parts).reshape(-1, int(t.shape[-1]))
    return np.ascontiguousarray(x, dtype=np.float32)


def measure(src: Any, t: GgufTensor, importance: Optional[np.ndarray],
            threads: int = 0) -> List[Candidate]:
    """Every candidate type's estimated error on `t` (the sample's error
    scaled to the tensor's size)."""
    from ...engine.gguf_blocks import dequantize_blocks, quantize_blocks

    x = _sample(src, t)
    numel = math.prod(int(d) for d in t.shape)
    scale = numel / max(x.size, 1)
    w = None if importance is None else np.asarray(importance, np.float32).reshape(1, -1)
    signal = float(np.sum((x.astype(np.float64) ** 2) * (1.0 if w is None else w)))
    row = int(t.shape[-1])
    cands = CANDIDATES_256 if row % 256 == 0 else CANDIDATES_32
    out = []
    for c in cands:
        if row % BLOCK_SIZE[c]:
            continue
        q, _ = quantize_blocks(c, x, importance=importance, threads=threads)
        y = dequantize_blocks(c, q, x.shape[0], x.shape[1], threads=threads)
        e = (x.astype(np.float64) - y) ** 2
        err = float(np.sum(e * (1.0 if w is None else w)))
        db = 10 * math.log10(signal / err) if err > 0 and signal > 0 else math.inf
        out.append(Candidate(c, _type_bytes(c, numel), err * scale, db))
    return out


def hull(cands: Sequence[Candidate]) -> List[Candidate]:
    """The lower convex hull of (bytes, err), bytes ascending: the
    candidates a budget can ever prefer."""
    pts = sorted(cands, key=lambda c: (c.bytes, c.err))
    keep: List[Candidate] = []
    for c in pts:
        if keep and c.err >= keep[-1].err:
            continue  # more bytes, no less error
        while len(keep) >= 2:
            a, b = keep[-2], keep[-1]
            # b is above the segment a-c: drop it
            if (b.err - a.err) * (c.bytes - a.bytes) >= (c.err - a.err) * (b.bytes - a.bytes):
                keep.pop()
            else:
                break
        keep.append(c)
    return keep


def allocate_bpw(src: Any, tensors: Sequence[GgufTensor], target_bpw: float,
                 fixed: Callable[[GgufTensor], Optional[TypeChoice]],
                 importance: Optional[Importance] = None,
                 threads: int = 0) -> Tuple[Dict[str, TypeChoice], Dict[str, Any]]:
    """Types of the free tensors (those `fixed` returns None for) under the
    budget ``target_bpw`` bits per weight over all `tensors`. Returns
    {llama.cpp name: choice} and a summary (budget, bytes, bpw)."""
    total_params = 0
    fixed_bytes = 0
    free: List[GgufTensor] = []
    for t in tensors:
        numel = math.prod(int(d) for d in t.shape)
        total_params += numel
        c = fixed(t)
        if c is not None:
            fixed_bytes += _type_bytes(c.type, numel)
        else:
            free.append(t)
    budget = int(target_bpw * total_params / 8)
    hulls: Dict[str, List[Candidate]] = {}
    for t in free:
        w = importance(t) if importance is not None else None
        hulls[t.name] = hull(measure(src, t, w, threads))
    at = {name: 0 for name in hulls}
    spent = fixed_bytes + sum(h[0].bytes for h in hulls.values())
    if spent > budget:
        need = 8.0 * spent / max(total_params, 1)
        raise ConfigurationError(
            f"--target-bpw {target_bpw:g} is below what this file can be: the tensors kept in "
            f"F32 / by --keep / --bits-for and the narrowest candidate of every other tensor "
            f"already take {need:.3f} bits per weight")
    heap: List[Tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            slope = (h[i].err - h[i + 1].err) / max(h[i + 1].bytes - h[i].bytes, 1)
            heapq.heappush(heap, (-slope, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        step = h[i + 1].bytes - h[i].bytes
        if spent + step > budget:
            continue  # this step does not fit; cheaper steps of others may
        spent += step
        at[name] = i + 1
        push(name)
    choices: Dict[str, TypeChoice] = {}
    for t in free:
        h, i = hulls[t.name], at[t.name]
        c = h[i]
        nxt = (f"; next {h[i + 1].type} would gain {h[i + 1].sqnr_db - c.sqnr_db:.2f} dB for "
               f"{BPW[h[i + 1].type] - BPW[c.type]:.3g} more bpw") if i + 1 < len(h) else \
            "; the widest useful candidate"
        choices[t.name] = TypeChoice(
            c.type, f"--target-bpw {target_bpw:g}: {c.type} (measured {c.sqnr_db:.2f} dB on "
                    f"sampled rows; candidates {', '.join(x.type for x in h)}{nxt})", False)
    summary = {"target_bpw": target_bpw, "budget_bytes": budget, "planned_bytes": spent,
               "planned_bpw": 8.0 * spent / max(total_params, 1), "measured": len(hulls)}
    return choices, summary


@dataclass(frozen=True)
class FixedChoices:
    """A rule from precomputed choices (allocate_bpw), `rest` for the others."""

    choices: Mapping[str, TypeChoice]
    rest: TypeRule

    def __call__(self, t: GgufTensor) -> TypeChoice:
        c = self.choices.get(t.name or "")
        return c if c is not None else self.rest(t)


def importance_from_calibration(calibration: Any) -> Optional[Importance]:
    """Per-column importance of a planned tensor from calibration statistics
    (the mean squared input of each column, floored), or None."""
    if calibration is None:
        return None
    from ...calibration.stats import CalibrationStats, load_stats

    stats = calibration if isinstance(calibration, CalibrationStats) else load_stats(calibration)

    def importance(t: Any) -> Optional[np.ndarray]:
        src_name = getattr(t, "source", None)
        if not src_name:
            return None
        base = src_name[:-len(".weight")] if src_name.endswith(".weight") else src_name
        layer = stats.resolve(base) or stats.resolve(src_name)
        if layer is None:
            return None
        w = np.asarray(stats.importance(layer, mode="mean"), dtype=np.float32).reshape(-1)
        return w if w.size == int(t.shape[-1]) else None

    return importance


def diffusion_override(keep: Sequence[str], bits_for: Dict[str, int]) -> Any:
    """--keep / --bits-for as export_diffusion_gguf's type_override, or None."""
    if not keep and not bits_for:
        return None
    from ...planning.rules import match_pattern
    from .diffusion_types import TypeDecision

    rules = check_bits_for(bits_for)

    def hit(pattern: str, t: Any) -> bool:
        return any(match_pattern(pattern, n) for n in (t.name, *t.source_names))

    def override(t: Any, d: Any) -> Any:
        if len(t.shape) <= 1:
            return d
        wide = "F16" if t.dtype == "float16" else "F32"
        for p in keep:
            if hit(p, t):
                return TypeDecision(wide, "keep", f"--keep {p}: kept unquantized ({wide})")
        for p, b in rules:
            if hit(p, t):
                if b >= 16:
                    return TypeDecision(wide, "bits-for", f"--bits-for {p}={b}: {wide}")
                want = BITS_TYPE[b]
                got, why = fallback(want, int(t.shape[-1]))
                got = wide if got == "F16" else got
                return TypeDecision(got, "bits-for", f"--bits-for {p}={b}: {want}" +
                                    (f"; {why}" if why else ""), got != want)
        return d

    return override
