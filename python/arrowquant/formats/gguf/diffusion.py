"""Diffusion models as GGUF files that the diffusion runtimes read.

Two layouts (docs/gguf-diffusion.md has each rule and the file it comes from):

* ``sdcpp`` -- stable-diffusion.cpp. SD 1.x / 2.x and SDXL: UNet, VAE and
  text encoder(s) in one file under the names sd.cpp's loader converts every
  input to (``model.diffusion_model.`` + LDM UNet names, ``first_stage_model.``
  + LDM VAE names, ``cond_stage_model.transformer.`` (+ ``cond_stage_model.1.
  transformer.`` for SDXL's second encoder) + Hugging Face CLIP names). FLUX:
  the transformer alone (sd.cpp's ``--diffusion-model``), reference names
  under ``model.diffusion_model.``. No ``general.architecture`` (sd.cpp's own
  files have none; it detects the version from tensor names).
* ``comfy`` -- ComfyUI-GGUF's UNet loader: the diffusion model alone, with
  reference names and the ``model.diffusion_model.`` / ``model.`` / ``net.``
  prefix stripped, ``general.architecture`` = the family (flux, sd3, sdxl,
  sd1, aura, hidream, cosmos, ltxv, hyvid, wan, lumina2), its F32 rules, and
  for sd1 / sdxl the convolution weights whose last dimension is not a
  multiple of 256 stored as (n/256, 256) with ``comfy.gguf.orig_shape.<name>``.

Input: a diffusers pipeline directory (model_index.json + unet/ vae/
text_encoder/ [text_encoder_2/] or transformer/), one component directory
(config.json + SafeTensors), or a single-file checkpoint with original names
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)
or reference names (FLUX ``double_blocks.*`` ...). Diffusers names are
converted to original ones (diffusion_names.py).

Streaming: tensors are read in row chunks (SafeTensors pread into one
buffer), fused / reordered / reshaped on the fly, and handed to the C++ GGUF
writer (the engine's GgufWriter, cpp/src/gguf.cc), which quantizes and writes them in
order. No state dict is ever built: the buffer of one chunk (a quarter of
``max_memory``), the writer's own chunk buffers and the component being read
are all that is resident.

Every per-tensor type comes from one function, `choose_tensor_type`, whose
decision (type, rule, reason) is in the report; the planner's measured
choices can be put behind it later.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...engine.finite import with_location
from ...errors import ArrowQuantError, ConfigurationError, MetadataError, ValidationError
from .diffusion_types import (ALIGNMENT, BLOCK_SIZE, COMFY_REARRANGE_THRESHOLD, COMFY_SHAPE_FIX,
                              DEFAULT_BLOCK_MODE, PRESETS, MixState, TypeDecision,
                              choose_tensor_type)
from .diffusion_inputs import _KIND_BY_CLASS, OutTensor, find_components, plan_tensors
from .tables import type_bytes

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------- writer


def comfy_shape_fix(family: str, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """ComfyUI-GGUF's rearrangement (convert.py, shape_fix families sd1 /
    sdxl): a tensor of 2+ dimensions with at least 512 elements, a multiple of
    256 in all, whose last dimension is not a multiple of 256, is stored as
    (n/256, 256)."""
    if family not in COMFY_SHAPE_FIX or len(shape) < 2:
        return None
    n = math.prod(int(d) for d in shape)
    if n >= COMFY_REARRANGE_THRESHOLD and n % 256 == 0 and int(shape[-1]) % 256:
        return (n // 256, 256)
    return None


def _written_shape(t: OutTensor, layout: str, family: str) -> Tuple[Tuple[int, ...], Optional[str]]:
    if layout == "comfy":
        fix = comfy_shape_fix(family, t.shape)
        if fix:
            return fix, "rearranged to (n/256, 256), comfy.gguf.orig_shape records the shape"
        if len(t.shape) > 4:
            return (math.prod(t.shape[:-1]), t.shape[-1]), \
                f"{len(t.shape)}-D: flattened, comfy.gguf.orig_shape records the shape"
    return tuple(t.shape), None


def _writable_types() -> Tuple[str, ...]:
    from . import tables

    return tuple(tables.GGUF_TYPES)


def export_diffusion_gguf(source: PathLike, out_path: PathLike, *, gguf_type: str = "Q8_0",
                          layout: str = "sdcpp", threads: int = 0, max_memory: Union[int, str] = "256MiB",
                          overwrite: bool = False, progress: Any = None,
                          name: Optional[str] = None, chunk_bytes: Optional[int] = None,
                          block_mode: Union[None, str, Dict[str, str]] = None,
                          type_override: Optional[Callable[[OutTensor, TypeDecision], TypeDecision]] = None,
                          target_bpw: Optional[float] = None, calibration: Any = None,
                          ) -> Dict[str, Any]:
    """Writes the diffusion model at `source` as one GGUF file in `layout`
    ("sdcpp" or "comfy"); returns the report (per tensor: type, rule, reason,
    error). `gguf_type` is a type (F32, F16, Q8_0, Q4_0, Q4_1, and the K types
    when the writer has them) or a llama.cpp preset name (Q4_K_M ...).
    `max_memory` bounds the read buffer (a quarter of it per chunk, at least
    1 MiB; `chunk_bytes` sets the chunk directly).
    `block_mode` "search" (ArrowQuant's error-minimizing block search) or
    "reference" (plain rounding: llama.cpp's reference bytes for Q8_0 / Q4_0 /
    Q4_1), or a dict by component kind ({"text_encoder": "reference"}; others
    search); None: DEFAULT_BLOCK_MODE (the text encoder rounded, as
    measured). `type_override(tensor, decision)` may replace a decision (the
    hook for measured per-tensor choices); `target_bpw` gives the tensors the
    layout leaves to the target type the types of least measured error under
    that many bits per weight, and `calibration` (statistics file or
    CalibrationStats) weights the measurement and the block search
    (diffusion_budget.py); its result is re-checked against the row
    length."""
    from ...engine import core as _core
    from ...sizes import parse_size

    t0 = time.perf_counter()
    target = str(gguf_type).upper()
    writable = _writable_types()
    if PRESETS.get(target, target) not in writable and target not in ("F16", "F32"):
        raise ConfigurationError(f"GGUF type {gguf_type!r} is not available (writable types: "
                                 f"{', '.join(writable)}; presets {', '.join(PRESETS)} need the K types)")
    out = Path(out_path)
    if out.is_dir():
        raise ArrowQuantError(f"{out}: is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ArrowQuantError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        raise ArrowQuantError(f"{out.parent}: output directory does not exist")
    budget = parse_size(max_memory, "max_memory") if not isinstance(max_memory, int) else max_memory
    if chunk_bytes is None:
        chunk_bytes = max(1 << 20, budget // 4)
    elif chunk_bytes <= 0:
        raise ConfigurationError(f"chunk_bytes must be positive, got {chunk_bytes}")

    components, input_kind = find_components(source)
    try:
        tensors, family, skipped, notes = plan_tensors(components, layout)
        mix = MixState()
        plan = []
        metadata: List[Tuple[str, str, Any]] = []
        for t in tensors:
            wshape, note = _written_shape(t, layout, family)
            d = choose_tensor_type(t.name, t.shape, wshape, t.dtype, target, layout, family,
                                   source_names=t.source_names, mix=mix, writable=writable)
            if type_override is not None:
                d = type_override(t, d)
                blk = BLOCK_SIZE.get(d.gguf_type)
                if blk and int(wshape[-1]) % blk:
                    raise ConfigurationError(f"{t.name}: override {d.gguf_type} impossible, row "
                                             f"length {wshape[-1]} not a multiple of {blk}")
            if note:
                metadata.append((f"comfy.gguf.orig_shape.{t.name}", "array[int32]",
                                 [int(x) for x in t.shape]))
            plan.append((t, wshape, d, note))
        from .diffusion_budget import allocate, importance_of

        importance = importance_of(calibration)
        allocation = None
        if target_bpw is not None:
            plan, allocation = allocate(plan, float(target_bpw), importance, threads)
        main = PRESETS.get(target, target)
        md: List[Tuple[str, str, Any]] = []
        if layout == "comfy":
            md.append(("general.architecture", "string", family))
        md += [
            ("general.name", "string", name or Path(source).name),
            ("general.alignment", "uint32", ALIGNMENT),
            ("general.quantization_version", "uint32", 2),
            ("general.file_type", "uint32", int(_core.gguf_file_type(main))),
            ("arrowquant.version", "string", _version()),
            ("arrowquant.layout", "string", layout),
            ("arrowquant.family", "string", family),
            ("arrowquant.gguf_type", "string", target),
        ]
        md += metadata
        specs = [(t.name, list(ws), d.gguf_type) for t, ws, d, _ in plan]
        if block_mode is None:
            block_mode = DEFAULT_BLOCK_MODE
        modes = block_mode if isinstance(block_mode, dict) else {"*": block_mode}
        if any(m not in ("search", "reference") for m in modes.values()):
            raise ConfigurationError(f"block_mode must be 'search' or 'reference', got {block_mode!r}")
        md.append(("arrowquant.block_mode", "string",
                   block_mode if isinstance(block_mode, str) else json.dumps(block_mode, sort_keys=True)))
        records = _write(out, md, specs, plan, chunk_bytes, threads, progress, block_mode,
                         importance)
    finally:
        for c in components:
            c.close()
    types: Dict[str, int] = {}
    for r in records:
        types[r["gguf_type"]] = types.get(r["gguf_type"], 0) + 1
    out_bytes = out.stat().st_size
    in_bytes = sum(r["input_bytes"] for r in records)
    return {
        "output": str(out), "source": str(source), "input_kind": input_kind,
        "components": [c.kind for c in components], "layout": layout, "family": family,
        "architecture": family if layout == "comfy" else None, "gguf_type": target,
        "output_format": "gguf", "gguf_version": 3, "tensors": len(records), "types": types,
        "fallbacks": [r["name"] for r in records if r["fallback"]],
        "orig_shape_keys": [r["name"] for r in records if r["orig_shape"]],
        "skipped": skipped, "notes": notes, "input_bytes": in_bytes, "output_bytes": out_bytes,
        "params": sum(math.prod(r["shape"]) for r in records),
        "chunk_bytes": chunk_bytes, "max_memory": budget,
        "seconds": time.perf_counter() - t0, "tensors_detail": records,
        "allocation": allocation,
        "importance_weighted": [r["name"] for r in records if r["importance_weighted"]],
    }


def _append(writer: Any, src: Any, source_name: str, data: np.ndarray, dtype: str, rows: int,
            cols: int, threads: int) -> Any:
    """writer.append_rows; a non-finite value's error also names the file."""
    try:
        return writer.append_rows(np.ascontiguousarray(data), dtype, rows, cols, threads)
    except ValidationError as exc:  # the engine placed it in the tensor; add the file
        try:
            where = src.location(source_name)
        except (KeyError, ArrowQuantError):
            where = str(src.root)
        raise ValidationError(with_location(str(exc), where)) from None


def _write(out: Path, md: List[Tuple[str, str, Any]], specs: List[Tuple[str, List[int], str]],
           plan: List[Tuple[OutTensor, Tuple[int, ...], TypeDecision, Optional[str]]],
           chunk_bytes: int, threads: int, progress: Any,
           block_mode: Union[str, Dict[str, str]] = "search",
           importance: Any = None) -> List[Dict[str, Any]]:
    from ...engine import core as _core
    from ...engine.dtypes import itemsize
    from ...engine.metrics import ErrorSums
    from ...progress import progress_fn as _progress

    total = sum(math.prod(t.shape) * itemsize(t.dtype) for t, _, _, _ in plan)
    report_progress = _progress(progress, max(total, 1))
    writer = _core.GgufWriter(str(out), md, specs, ALIGNMENT)
    records: List[Dict[str, Any]] = []
    buf: Optional[np.ndarray] = None
    done = 0
    try:
        for t, wshape, d, note in plan:
            t_start = time.perf_counter()
            src = t.component.open()
            isz = itemsize(t.dtype)
            numel = math.prod(t.shape)
            # The writer takes whole rows of the written shape (first dimension).
            wcols = numel // int(wshape[0]) if len(wshape) >= 2 else numel
            mode = block_mode if isinstance(block_mode, str) else \
                block_mode.get(t.component.kind, block_mode.get("*", "search"))
            w = importance(t, wshape) if importance is not None and d.gguf_type in BLOCK_SIZE \
                else None
            if w is not None:  # calibration: the importance-weighted search
                mode = "search"
                writer.set_tensor_options(mode, np.ascontiguousarray(w, np.float32))
            elif mode != "search" and d.gguf_type in BLOCK_SIZE:
                writer.set_tensor_options(mode)
            sums = ErrorSums()
            carry = np.empty(0, dtype=np.uint8)
            chunks = 0
            for part in t.parts:
                info = src.info(part.source)
                if len(info.shape) <= 1:
                    # 1-D: the part counts elements; the reader's view is one row.
                    raw = src.read(part.source, 0, 1)
                    data = raw[part.row_start * isz:(part.row_start + part.row_count) * isz]
                    carry = np.concatenate([carry, data]) if carry.size else data.copy()
                    done += data.size
                    continue
                row_bytes = max(1, info.nbytes // max(info.rows, 1))
                per = max(1, min(part.row_count, chunk_bytes // row_bytes))
                need = per * row_bytes
                if buf is None or buf.size < need:
                    buf = None
                    buf = np.empty(need, dtype=np.uint8)
                for r0 in range(part.row_start, part.row_start + part.row_count, per):
                    n = min(per, part.row_start + part.row_count - r0)
                    raw = src.read(part.source, r0, n, out=buf[: n * row_bytes])
                    data = np.concatenate([carry, raw]) if carry.size else raw
                    elems = data.size // isz
                    whole = elems // wcols * wcols
                    if whole:
                        s = _append(writer, src, part.source, data[: whole * isz], t.dtype,
                                    whole // wcols, wcols, threads)
                        sums.merge(ErrorSums(*s))
                        chunks += 1
                    carry = data[whole * isz:].copy()
                    done += n * row_bytes
                    if report_progress is not None:
                        report_progress(t.name, done / max(total, 1))
            if carry.size and (carry.size // isz) % wcols == 0:
                s = _append(writer, src, part.source, carry, t.dtype, carry.size // isz // wcols,
                            wcols, threads)
                sums.merge(ErrorSums(*s))
                chunks += 1
                carry = carry[:0]
            if carry.size:
                raise MetadataError(f"{t.name}: {carry.size // isz} elements left over after "
                                    f"rows of {wcols} (shape {t.shape})")
            m = sums.metrics()
            records.append({
                "name": t.name, "sources": t.source_names, "component": t.component.kind,
                "shape": list(t.shape), "gguf_dims": list(reversed(wshape)),
                "orig_shape": note is not None, "source_dtype": t.dtype,
                "gguf_type": d.gguf_type, "rule": d.rule, "reason": d.reason + (f"; {note}" if note else ""),
                "fallback": d.fallback, "block_mode": mode if d.gguf_type in BLOCK_SIZE else None,
                "importance_weighted": w is not None,
                "input_bytes": numel * isz,
                "output_bytes": type_bytes(d.gguf_type, numel),
                "chunks": chunks, "cosine": m.cosine, "rel_mse": m.rel_mse,
                "sqnr_db": m.sqnr_db if math.isfinite(m.sqnr_db) else None,
                "max_abs_error": m.max_abs_error, "seconds": time.perf_counter() - t_start,
            })
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return records


def _version() -> str:
    from ...version import __version__

    return __version__


def format_report(report: Dict[str, Any], verbose: bool = False) -> str:
    """Human-readable summary of an export_diffusion_gguf report."""
    from ...sizes import format_size

    lines = []
    if verbose:
        for r in report["tensors_detail"]:
            shape = "x".join(str(d) for d in r["shape"])
            sq = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
            mode = f" (blocks: {r['block_mode']})" if r.get("block_mode") else ""
            lines.append(f"  {r['name']:<72} {shape:<16} {r['gguf_type']:<5} {sq:>9}  "
                         f"{r['rule']}: {r['reason']}{mode}")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items()))
    arch = report["architecture"] or "(none: sd.cpp detects the version from names)"
    lines.append(f"wrote {report['output']}: GGUF v3, {report['layout']} layout, family "
                 f"{report['family']}, general.architecture {arch}, {report['tensors']} tensors "
                 f"({types}) in {report['seconds']:.2f} s")
    lines.append(f"  {format_size(report['input_bytes'])} -> {format_size(report['output_bytes'])}")
    rules: Dict[str, int] = {}
    for r in report["tensors_detail"]:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    lines.append("  decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
    a = report.get("allocation")
    if a:
        lines.append(f"  --target-bpw {a['target_bpw']:g}: {a['measured']} tensors measured, "
                     f"planned {a['planned_bpw']:.3f} bits per weight")
    if report.get("importance_weighted"):
        lines.append(f"  {len(report['importance_weighted'])} tensor(s) importance-weighted by "
                     f"--calibration")
    if report["orig_shape_keys"]:
        lines.append(f"  {len(report['orig_shape_keys'])} tensor(s) rearranged with "
                     "comfy.gguf.orig_shape")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    if report["skipped"]:
        lines.append(f"  skipped {len(report['skipped'])}: " +
                     ", ".join(s["name"] for s in report["skipped"][:6]) +
                     (" ..." if len(report["skipped"]) > 6 else ""))
    return "\n".join(lines)


def is_diffusion_input(path: PathLike) -> bool:
    """True for a diffusers pipeline / diffusion component directory or a
    single-file diffusion checkpoint (the CLI routes those here)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").exists():
            return True
        cfg = p / "config.json"
        if cfg.exists():
            try:
                c = json.loads(cfg.read_text())
            except (OSError, ValueError):
                return False
            return str(c.get("_class_name")) in _KIND_BY_CLASS and c.get("_class_name") != "CLIPTextModel"
    return False
