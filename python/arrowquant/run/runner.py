"""Runs a Job: one model (or each component of a diffusers pipeline, in a
loop at one level) from its source through the planner and the streaming
pipeline into an ArrowQuant Parquet V2 directory, the report and
metadata.json written last."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import FormatError, ModelNotFoundError, QuantizationError
from ..files import atomic_write_text, check_inside, check_separate, fresh
from ..text import check_path_text, printable
from ..formats.arrow_checks import check_tensor
from ..formats.v2_schema import FORMAT_NAME, INDEX_NAME, format_version
from ..job import Job
from ..planning.plan import Planner, TensorPlan
from ..progress import ProgressArg, progress_fn
from ..sources import WEIGHT_SUFFIXES, ModelSource, is_pipeline_dir, open_model
from ..version import __version__
from .layout import PipelineOptions, check_memory_budget
from .report import PIPELINE_FORMAT, QuantizeSummary, TensorRecord, combine, finished_summary, \
    summarize
from .staging import LOCK_NAME, STAGING, OutputLock, check_run_file, fingerprint, mark_run, prepare_output, \
    read_own_metadata
from .buffers import lean_allocators
from .streaming import StreamingQuantizer

OnTensor = Optional[Callable[[TensorRecord], None]]


def run(job: Job, progress: ProgressArg = None, on_tensor: OnTensor = None,
        cancel: Optional[threading.Event] = None) -> QuantizeSummary:
    """Quantizes job.input into job.output (see the module doc)."""
    # Calibrated layers with superblock parameters (the INT4 / INT2 default) are
    # written with float16 parameters at twice the group by the calibrated
    # planner (spec.weighted_param_spec); the other layers keep superblock.
    check_separate(job.input, job.output)
    check_path_text(job.output, "output path")
    if is_pipeline_dir(job.input):
        return run_pipeline(job, progress, on_tensor, cancel)
    return run_model(job, job.input, job.output, job.overwrite, job.resume, job.calibration,
                     progress, on_tensor, cancel)


def _stats(calibration: Any) -> Any:
    """CalibrationStats from a statistics file path (or as given)."""
    if isinstance(calibration, (str, os.PathLike)):
        from ..calibration.stats import load_stats

        stats = load_stats(calibration)
        stats.metadata["stats_path"] = str(Path(calibration).resolve())
        return stats
    return calibration


def _calibration_label(calibration: Any) -> Optional[str]:
    """What the report and run.json say of the statistics used."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        return str(Path(calibration).resolve())
    meta = getattr(calibration, "metadata", {}) or {}
    return meta.get("stats_path") or f"statistics of {meta.get('model', 'an unnamed model')}"


def settings_record(job: Job, planner: Any, calibration: Any) -> Dict[str, Any]:
    """The settings a run records in run.json (a resume must match them) and
    in metadata.json ("quantization")."""
    c = job.config
    return {
        "bits": c.bit_width, "group_size": c.group_size, "scheme": c.scheme, "method": c.method,
        "param_dtype": c.param_dtype, "quantize_1d": c.quantize_1d, "engine": job.engine,
        "chunk_size": job.chunk_size, "fallback": any(v for v in c.fallback_thresholds.values()),
        "fail_fast": c.fail_fast,
        "min_cosine": {str(b): v for b, v in c.fallback_thresholds.items() if v},
        "planner": type(planner).__name__,
        "calibration": _calibration_label(calibration),
        "equalization": c.enable_spatial if calibration is not None else None,
        "config": c.to_dict(), **job.record_extra,
    }


def plan_model(job: Job, source: ModelSource, planner: Planner, stats: Any,
               report: Optional[Callable[[str, float], None]]) -> Dict[str, TensorPlan]:
    """Plans every tensor of the source (calibration applied when given)."""
    from ..errors import ConfigurationError

    if report and job.planner is not None:
        report(f"planning {len(source.tensors)} tensors", 0.0)
    plans = planner.plan(source.tensors)
    missing = [t.name for t in source.tensors if t.name not in plans]
    if missing:
        raise ConfigurationError(f"the planner gave no plan for {len(missing)} tensor(s), "
                                 f"e.g. {missing[0]!r}")
    if stats is not None:
        from ..planning.calibrated import apply_calibration

        if report:
            report("calibrated planning (importance, equalization)", 0.0)
        apply_calibration(plans, source.tensors, stats, source,
                          equalization=job.config.enable_spatial,
                          importance_mode="max" if job.config.enable_time_aware else "mean",
                          threads=job.threads)
    return plans


def run_model(job: Job, src: Path, out: Path, overwrite: bool, resume: bool, calibration: Any,
              progress: ProgressArg, on_tensor: OnTensor,
              cancel: Optional[threading.Event]) -> QuantizeSummary:
    """One model (a file or a directory of weights) into the V2 directory `out`."""
    from ..sources.modality import detect_modality

    t0 = time.perf_counter()
    if resume and read_own_metadata(out) is not None:
        # Finished: every model file was in place before metadata.json was
        # written. Only a leftover staging folder (a stop during cleanup) remains.
        summary = finished_summary(out)
        shutil.rmtree(out / STAGING, ignore_errors=True)
        return summary
    prepare_output(out, overwrite, resume, check_only=True)  # fail before any work
    if job.executor == "ray":
        from .ray_executor import connect

        connect(job.ray_address)
    stats = None if calibration is None else _stats(calibration)
    cfg = job.config
    with lean_allocators(), open_model(src) as source:
        prints = fingerprint(source.weight_files)  # before anything is read
        for t in source.tensors:  # what the V2 reader would refuse is never written
            check_tensor(source.location(t.name), t.name, list(t.shape))
        report = progress_fn(progress, source.total_bytes)
        modality_info = detect_modality(source.root, [t.name for t in source.tensors],
                                        metadata=source.metadata, config=cfg.modality).as_dict()
        modality = modality_info["modality"]
        opts = PipelineOptions(
            threads=cfg.num_threads, max_memory=job.max_memory, chunk_size=job.chunk_size,
            shard_size=job.shard_size, engine=job.engine, fail_fast=cfg.fail_fast,
            modality=modality,
            is_diffusion_model=modality in ("image", "audio") or bool(
                source.metadata.get("is_diffusion_model")))
        planner = job.planner if job.planner is not None else _diffusion_planner(job, source,
                                                                                  stats)
        plans = plan_model(job, source, planner, stats, report)
        settings = settings_record(job, planner, calibration)
        check_memory_budget(source.tensors, plans, opts)
        prepare_output(out, overwrite, resume)
        lock = OutputLock(out)
        lock.acquire()
        try:
            copied = [p.name for p in source.extra_files]
            mark_run(out, "model", ["metadata.json", "quantization_report.json", INDEX_NAME,
                                    *copied])
            check_run_file(out, source.root, settings, prints)
            runner = _quantizer(job, src, source, plans, out, opts, report, on_tensor, cancel)
            records = runner.run()
            if fingerprint(source.weight_files) != prints:
                from ..errors import FormatError

                raise FormatError(f"{source.root}: input files changed while they were being "
                                  "read; the output was not finished")
            files = runner.finish()
            for extra in source.extra_files:
                tmp = fresh(out / (extra.name + ".tmp"))
                shutil.copy2(extra, tmp)
                os.replace(tmp, out / extra.name)
            summary = summarize(records, output=out, source=str(source.root),
                                source_format=source.format, modality=modality,
                                bits=cfg.bit_width, seconds=time.perf_counter() - t0, files=files)
            summary.details = getattr(runner, "details", dict)()
            atomic_write_text(out / "quantization_report.json", json.dumps(
                {"format": FORMAT_NAME, "tool_version": __version__,
                 "tensors": [r.as_dict() for r in records]}, indent=2))
            metadata = {
                "format": FORMAT_NAME,
                "format_version": format_version(
                    any(p.bits and p.param_dtype == "superblock" for p in plans.values()),
                    any(p.bits and p.spec.grid for p in plans.values())),
                "modality": modality,
                "modality_detection": modality_info,
                "is_diffusion_model": opts.is_diffusion_model,
                "source": {"path": str(source.root), "format": source.format},
                "quantization": settings,
                "tool": {"name": "arrowquant", "version": __version__},
                "files": files,
                "copied_files": copied,
                "summary": summary.as_dict(),
            }
            atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2))  # last: done
            shutil.rmtree(out / STAGING, ignore_errors=True)
        finally:
            lock.release(remove=(out / "metadata.json").exists())
    _check_accuracy(job, out, summary)
    return summary


def _quantizer(job: Job, src: Path, source: ModelSource, plans: Dict[str, TensorPlan], out: Path,
               opts: PipelineOptions, report: Any, on_tensor: OnTensor,
               cancel: Optional[threading.Event]) -> StreamingQuantizer:
    """The job's executor: this machine, or Ray tasks (the same bytes)."""
    if job.executor == "ray":
        from .ray_executor import RayQuantizer, options_from_env

        return RayQuantizer(source, plans, out, opts, src,
                            options_from_env(job.ray_address, job.ray_cpus_per_task, job.on_unit),
                            progress=report, on_tensor=on_tensor, cancel=cancel)
    return StreamingQuantizer(source, plans, out, opts, progress=report, on_tensor=on_tensor,
                              cancel=cancel)


def _diffusion_planner(job: Job, source: ModelSource, stats: Any) -> Planner:
    """The planner of the job's config, reading samples from the source the run
    already opened, and only when bits are allocated from measurements."""
    from ..planning.diffusion import DiffusionPlanner

    return DiffusionPlanner(job.config, stats=stats, source=source,
                            measure=job.config.mixed_precision)


def _check_accuracy(job: Job, out: Path, summary: QuantizeSummary) -> None:
    cfg = job.config
    if summary.mean_cosine is not None and summary.mean_cosine < cfg.min_accuracy:
        message = (f"mean cosine {summary.mean_cosine:.4f} is below min_accuracy "
                   f"{cfg.min_accuracy}")
        if cfg.fail_fast:
            raise QuantizationError(f"{out}: {message} (fail_fast)")
        warnings.warn(f"{out}: {message}", RuntimeWarning)


def _has_weights(d: Path) -> bool:
    return any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir())


# Names ArrowQuant writes at the top of its own outputs: a pipeline entry by
# one of these names would be mistaken for (or overwrite) them.
RESERVED_NAMES = ("metadata.json", "quantization_report.json", STAGING, LOCK_NAME)


def pipeline_entries(src: Path) -> Tuple[List[Path], List[str]]:
    """The component folders of a pipeline and the names of its top-level
    files, every one checked against the symlink rule (files.check_inside)
    and the names ArrowQuant reserves."""
    components, files = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            continue
        check_inside(src, p, "pipeline entry")
        if p.name in RESERVED_NAMES[1:] or (p.is_dir() and p.name == "metadata.json") or \
                p.name.endswith(".tmp"):
            raise FormatError(f"{printable(p)}: a pipeline entry may not be named {p.name!r}, "
                              "a name ArrowQuant writes in its output")
        if p.is_dir():
            components.append(p)
        elif p.is_file() and p.name != "metadata.json":
            files.append(p.name)
    return components, files


def run_pipeline(job: Job, progress: ProgressArg, on_tensor: OnTensor,
                 cancel: Optional[threading.Event]) -> QuantizeSummary:
    """A diffusers pipeline (model_index.json + component folders): each
    component with weights becomes its own V2 directory under the output;
    other folders and files are copied unchanged. metadata.json at the top is
    written last and lists the components."""
    src, out, resume = job.input, job.output, job.resume
    t0 = time.perf_counter()
    if resume and read_own_metadata(out) is not None:
        return finished_summary(out)
    prepare_output(out, job.overwrite, resume)
    (out / STAGING).mkdir(exist_ok=True)
    lock = OutputLock(out)
    lock.acquire()
    try:
        components, top_files = pipeline_entries(src)
        quantized = [d for d in components if _has_weights(d)]
        mark_run(out, "pipeline", ["metadata.json", "quantization_report.json", *top_files,
                                   *(c.name for c in components)])
        # Statistics are recorded on the denoiser (what `arrowquant calibrate`
        # runs); applying them by name to another component would be wrong.
        names = [d.name for d in quantized]
        denoiser = next((n for n in ("unet", "transformer") if n in names), None)
        summaries: List[QuantizeSummary] = []
        for i, comp in enumerate(quantized):
            comp_out = out / comp.name
            comp_progress = progress
            if callable(progress):
                comp_progress = (lambda m, f, i=i, name=comp.name:
                                 progress(f"{name}/{m}", (i + f) / len(quantized)))
            if (comp_out / "metadata.json").exists() and resume:
                summaries.append(finished_summary(comp_out))
                continue
            summaries.append(run_model(
                job, comp, comp_out, overwrite=not resume and comp_out.exists(),
                resume=resume and comp_out.exists(),
                calibration=job.calibration if comp.name == denoiser else None,
                progress=comp_progress, on_tensor=on_tensor, cancel=cancel))
        for comp in components:
            if comp not in quantized and not (out / comp.name).exists():
                for p in comp.rglob("*"):
                    check_inside(src, p, "file")
                shutil.copytree(comp, fresh(out / (comp.name + ".tmp")))
                os.replace(out / (comp.name + ".tmp"), out / comp.name)
        for name in top_files:
            shutil.copy2(src / name, fresh(out / (name + ".tmp")))
            os.replace(out / (name + ".tmp"), out / name)
        if not summaries:
            raise ModelNotFoundError(f"{src}: a diffusers pipeline with no component weights")
        summary = combine(summaries, src, out, time.perf_counter() - t0)
        superblock = any(r.param_dtype == "superblock" for s in summaries for r in s.records)
        grid = any(str(getattr(r, "method", "")).startswith("grid-")
                   for s in summaries for r in s.records)
        meta = {"format": PIPELINE_FORMAT, "format_version": format_version(superblock, grid),
                "components": [c.name for c in quantized],
                "copied": [c.name for c in components if c not in quantized],
                "copied_files": top_files,
                "modality": summary.modality, "tool": {"name": "arrowquant", "version": __version__},
                "summary": summary.as_dict()}
        report = {"format": PIPELINE_FORMAT, "tensors": [
            {**r.as_dict(), "name": f"{c.name}/{r.name}"}
            for c, s in zip(quantized, summaries) for r in s.records]}
        atomic_write_text(out / "quantization_report.json", json.dumps(report, indent=2))
        atomic_write_text(out / "metadata.json", json.dumps(meta, indent=2))
        shutil.rmtree(out / STAGING, ignore_errors=True)
        return summary
    finally:
        lock.release(remove=(out / "metadata.json").exists())
