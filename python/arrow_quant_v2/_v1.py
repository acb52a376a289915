"""The first version's Python API (``arrow_quant_v2``) on top of the new engine.

People moving from the first version keep their code: ``ArrowQuantV2``,
``AsyncArrowQuantV2``, ``ShardedSafeTensorsLoader``, ``quantize_diffusion_model``,
``load_sharded_safetensors`` and ``DiffusionQuantConfig`` behave as they did,
while the work is done by ``arrowquant.quantize`` / ``arrowquant.load`` and the
C++ engine. docs/migration.md maps every old call to the new one.

Progress callbacks are called as ``(message, fraction)`` (the async API's
``quantize_multiple_models_async`` as ``(model_index, message, fraction)``);
an exception raised by a callback becomes a RuntimeWarning and never stops a
run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from arrowquant.config import DiffusionQuantConfig
from arrowquant.errors import (
    ArrowQuantError,
    CancelledError,
    ConfigurationError,
    ModelNotFoundError,
    QuantizationError,
    ShapeMismatchError,
    ValidationError,
)

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[str, float], Any]
MODES = ("diffusion", "base")
_MIB = 1024 * 1024


def _safe_callback(callback: Optional[Callable[..., Any]]) -> Optional[Callable[..., None]]:
    """Wraps a user callback so that its exceptions are reported as warnings."""
    if callback is None:
        return None

    def call(*args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # a broken callback must not stop a long run
            warnings.warn(f"progress callback raised {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=2)

    return call


def _config_for(mode: str, config: Optional[Any]) -> DiffusionQuantConfig:
    if config is None:
        return DiffusionQuantConfig.from_profile("base") if mode == "base" \
            else DiffusionQuantConfig()
    if isinstance(config, DiffusionQuantConfig):
        config.validate()
        return config
    if isinstance(config, Mapping):
        return DiffusionQuantConfig.from_dict(config)
    raise ConfigurationError(
        f"config must be a DiffusionQuantConfig or a dict, got {type(config).__name__}")


class ArrowQuantV2:
    """The first version's synchronous entry point.

    ``mode="diffusion"`` starts from the "local" profile defaults
    (INT4, group size 128), ``mode="base"`` from the "base" profile; a
    ``config`` passed to a call replaces them."""

    def __init__(self, mode: str = "diffusion") -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be 'diffusion' or 'base', got {mode!r}")
        self.mode = mode

    # ------------------------------------------------------------- models

    def quantize_diffusion_model(self, model_path: PathLike, output_path: PathLike,
                                 config: Optional[Any] = None,
                                 progress_callback: Optional[ProgressCallback] = None,
                                 *, cancel: Optional[threading.Event] = None,
                                 overwrite: bool = True) -> Dict[str, Any]:
        """Quantizes a model directory (SafeTensors, sharded or not; a diffusers
        pipeline; Parquet V1) into an ArrowQuant V2 directory. Returns
        {quantized_path, compression_ratio, cosine_similarity, model_size_mb,
        modality, bit_width, quantization_time_s} (plus min_cosine_similarity,
        tensors, quantized_tensors). compression_ratio is source bytes over
        quantized payload bytes (codes + parameters); model_size_mb is the size
        of the Parquet files on disk (which adds the file format's overhead).

        The first version replaced an existing output; so does this one
        (``overwrite=True``), but only output that ArrowQuant wrote."""
        from arrowquant import api

        if not Path(model_path).exists():
            raise ModelNotFoundError(f"{model_path}: no such model path")
        cfg = _config_for(self.mode, config)
        report = _safe_callback(progress_callback)
        t0 = time.perf_counter()
        if report:
            report("starting", 0.0)
        # With a config, arrowquant.quantize plans each layer with the
        # diffusion-aware planner and checks min_accuracy (a warning, or a
        # QuantizationError under fail_fast), as the first version did.
        summary = api.quantize(model_path, output_path, config=cfg, overwrite=overwrite,
                               progress=report or False, cancel=cancel,
                               config_dict={"compat": {"api": "arrow_quant_v2",
                                                       "mode": self.mode}})
        seconds = time.perf_counter() - t0
        cosine = summary.mean_cosine if summary.mean_cosine is not None else 1.0
        if report:
            report("done", 1.0)
        return {
            "quantized_path": str(output_path),
            "compression_ratio": float(summary.compression_ratio),
            "cosine_similarity": float(cosine),
            "min_cosine_similarity": summary.min_cosine,
            "model_size_mb": _weights_on_disk(Path(output_path)) / _MIB,
            "modality": summary.modality,
            "bit_width": int(cfg.bit_width),
            "quantization_time_s": seconds,
            "tensors": summary.tensors,
            "quantized_tensors": summary.quantized_tensors,
        }

    def quantize_from_safetensors(self, safetensors_path: PathLike, output_path: PathLike,
                                  config: Optional[Any] = None,
                                  progress_callback: Optional[ProgressCallback] = None,
                                  **kwargs: Any) -> Dict[str, Any]:
        """Same as quantize_diffusion_model for a ``.safetensors`` file, a
        ``*.safetensors.index.json`` or a directory of SafeTensors shards."""
        p = Path(safetensors_path)
        if not p.exists():
            raise ModelNotFoundError(f"{p}: no such file or directory")
        is_st = p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json") or (
            p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*/*.safetensors"))))
        if not is_st:
            raise ValidationError(f"{p}: not a SafeTensors file or directory of SafeTensors shards")
        return self.quantize_diffusion_model(p, output_path, config, progress_callback, **kwargs)

    def validate_quality(self, original_path: PathLike, quantized_path: PathLike,
                         min_accuracy: Optional[float] = None) -> Dict[str, Any]:
        """Compares a quantized model with its original tensor by tensor:
        {cosine_similarity (mean), min_cosine_similarity, per_layer_accuracy
        {name: cosine}, passed, failed_layers, compression_ratio, model_size_mb
        (the Parquet files on disk)}.
        `passed` uses the per-bit-width thresholds, and also `min_accuracy` on
        the mean when given."""
        from arrowquant import api

        report = api.validate(original_path, quantized_path)
        per_layer = {l.name: float(l.cosine) for l in report.layers}
        mean = report.mean_cosine
        passed = report.passed and (min_accuracy is None or mean >= min_accuracy)
        meta_path = Path(quantized_path) / "metadata.json"
        summary = json.loads(meta_path.read_text()).get("summary", {}) if meta_path.exists() else {}
        return {
            "cosine_similarity": float(mean),
            "min_cosine_similarity": min(per_layer.values()) if per_layer else 1.0,
            "per_layer_accuracy": per_layer,
            "passed": bool(passed),
            "failed_layers": [l.name for l in report.layers if not l.passed],
            "compression_ratio": summary.get("compression_ratio"),
            "model_size_mb": _weights_on_disk(Path(quantized_path)) / _MIB,
        }

    # ------------------------------------------------------------- in memory

    def _bits(self, bit_width: Optional[int]) -> int:
        bits = bit_width if bit_width is not None else _config_for(self.mode, None).bit_width
        if bits not in (2, 4, 8):
            raise ConfigurationError(f"bit_width must be 2, 4 or 8, got {bit_width!r}")
        return int(bits)

    def _quantize_one(self, name: str, array: Any, bits: int, group_size: int) -> Dict[str, Any]:
        from arrowquant.engine import quantize_array

        a = np.asarray(array)
        if a.dtype not in (np.float32, np.float16):
            if a.dtype.kind not in "fiu":
                raise ValidationError(f"layer {name!r}: dtype {a.dtype} cannot be quantized")
            a = a.astype(np.float32)
        a = np.ascontiguousarray(a)
        qt = quantize_array(a, bits=bits, group_size=group_size, name=name)
        m = qt.metrics
        return {
            "quantized_data": qt.data, "scales": qt.scales, "zero_points": qt.zero_points,
            "shape": list(qt.shape), "dtype": qt.dtype, "bit_width": bits,
            "group_size": group_size, "scheme": qt.scheme,
            "cosine_similarity": m.cosine if m else None,
            "compression_ratio": a.nbytes / qt.nbytes if qt.nbytes else 0.0,
            "quantized": qt,
        }

    def quantize_batch(self, weights: Mapping[str, Any], bit_width: Optional[int] = None,
                       continue_on_error: bool = False,
                       group_size: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
        """Quantizes a dict of numpy arrays in memory, one engine call per
        array. Returns {name: {quantized_data, scales, zero_points, shape,
        dtype, bit_width, group_size, scheme, cosine_similarity,
        compression_ratio, quantized}} where `quantized` is the
        arrowquant.QuantizedTensor (dequantize with arrowquant.dequantize_array).

        A layer that fails raises QuantizationError naming it; with
        ``continue_on_error=True`` its entry is {"error": message,
        "error_type": class name} and the others are still quantized."""
        if not isinstance(weights, Mapping):
            raise ValidationError(f"weights must be a dict of name -> array, got "
                                  f"{type(weights).__name__}")
        bits = self._bits(bit_width)
        g = int(group_size or _config_for(self.mode, None).spec_for(bits).group_size)
        out: Dict[str, Dict[str, Any]] = {}
        for name, array in weights.items():
            try:
                out[name] = self._quantize_one(str(name), array, bits, g)
            except ArrowQuantError as exc:
                if not continue_on_error:
                    raise QuantizationError(f"layer {name!r}: {exc}") from exc
                warnings.warn(f"layer {name!r} not quantized: {exc}", RuntimeWarning, stacklevel=2)
                out[name] = {"error": str(exc), "error_type": type(exc).__name__}
        return out

    def quantize_arrow(self, table_or_batch: Any, bit_width: Optional[int] = None,
                       group_size: Optional[int] = None) -> "Any":
        """Quantizes an Arrow table or record batch with columns
        ``layer_name: string, weights: list<float32>, shape: list<int64>``
        (every batch of a table). The weights are read in place from the
        Arrow buffers (no Python lists). Returns a pyarrow Table with one row
        per layer: layer_name, shape, bit_width, group_size, scheme,
        quantized_data (large_binary, FORMAT.md packing), scales and
        zero_points (list<float32>), cosine_similarity."""
        import pyarrow as pa

        if isinstance(table_or_batch, pa.RecordBatch):
            batches = [table_or_batch]
        elif isinstance(table_or_batch, pa.Table):
            batches = table_or_batch.to_batches()
        else:
            raise ValidationError("quantize_arrow takes a pyarrow Table or RecordBatch, got "
                                  f"{type(table_or_batch).__name__}")
        schema = table_or_batch.schema
        for col in ("layer_name", "weights", "shape"):
            if col not in schema.names:
                raise ValidationError(f"Arrow input lacks column {col!r} (needs layer_name: string, "
                                      "weights: list<float32>, shape: list<int64>)")
        wtype = schema.field("weights").type
        if not (pa.types.is_list(wtype) or pa.types.is_large_list(wtype)) or \
                wtype.value_type not in (pa.float32(), pa.float16()):
            raise ValidationError(f"column 'weights' must be list<float32>, got {wtype}")
        bits = self._bits(bit_width)
        g = int(group_size or _config_for(self.mode, None).spec_for(bits).group_size)
        names: List[str] = []
        shapes: List[List[int]] = []
        datas: List[np.ndarray] = []
        scales: List[np.ndarray] = []
        zeros: List[np.ndarray] = []
        cosines: List[Optional[float]] = []
        for batch in batches:
            layer = batch.column(schema.get_field_index("layer_name"))
            weights = batch.column(schema.get_field_index("weights"))
            shape_col = batch.column(schema.get_field_index("shape"))
            if weights.null_count or layer.null_count or shape_col.null_count:
                raise ValidationError("Arrow input has null layer_name, weights or shape values")
            values = weights.values.to_numpy(zero_copy_only=weights.values.null_count == 0)
            offsets = weights.offsets.to_numpy()
            layer_names = layer.to_pylist()
            shape_list = shape_col.to_pylist()
            for i in range(len(batch)):
                name = layer_names[i]
                flat = values[offsets[i]:offsets[i + 1]]
                shape = [int(d) for d in shape_list[i]]
                if math.prod(shape) != flat.size:
                    raise ShapeMismatchError(f"layer {name!r}: shape {shape} holds "
                                             f"{math.prod(shape)} values, weights has {flat.size}")
                r = self._quantize_one(name, flat.reshape(shape), bits, g)
                names.append(name)
                shapes.append(shape)
                datas.append(np.asarray(r["quantized_data"], dtype=np.uint8))
                scales.append(r["scales"])
                zeros.append(r["zero_points"])
                cosines.append(r["cosine_similarity"])
        data_offsets = np.zeros(len(datas) + 1, dtype=np.int64)
        np.cumsum([d.size for d in datas], out=data_offsets[1:])
        blob = np.concatenate(datas) if datas else np.zeros(0, np.uint8)
        data_arr = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(datas), [None, pa.py_buffer(data_offsets), pa.py_buffer(blob)])

        def list_f32(parts: List[np.ndarray]) -> pa.Array:
            offs = np.zeros(len(parts) + 1, dtype=np.int32)
            np.cumsum([p.size for p in parts], out=offs[1:])
            vals = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
            return pa.ListArray.from_arrays(pa.array(offs), pa.array(vals))

        return pa.table({
            "layer_name": pa.array(names, pa.string()),
            "shape": pa.array(shapes, pa.list_(pa.int64())),
            "bit_width": pa.array([bits] * len(names), pa.int32()),
            "group_size": pa.array([g] * len(names), pa.int64()),
            "scheme": pa.array(["asymmetric"] * len(names), pa.string()),
            "quantized_data": data_arr,
            "scales": list_f32(scales),
            "zero_points": list_f32(zeros),
            "cosine_similarity": pa.array(cosines, pa.float64()),
        })


def _weights_on_disk(out: Path) -> int:
    """Bytes of the Parquet weight files of an output (pipelines: every component)."""
    return sum(p.stat().st_size for p in out.rglob("*.parquet") if p.is_file())


def quantize_diffusion_model(model_path: PathLike, output_path: PathLike,
                             config: Optional[Any] = None,
                             progress_callback: Optional[ProgressCallback] = None,
                             mode: str = "diffusion") -> Dict[str, Any]:
    """Module-level shortcut of ArrowQuantV2(mode).quantize_diffusion_model."""
    return ArrowQuantV2(mode).quantize_diffusion_model(model_path, output_path, config,
                                                        progress_callback)


# ---------------------------------------------------------------- async


class _CallbackPump:
    """Delivers progress events from a worker thread to the event loop, in
    order, calling the user's callback there and awaiting it when it is a
    coroutine function. Exceptions in the callback become warnings."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Optional[Callable[..., Any]],
                 prefix: Tuple[Any, ...] = ()) -> None:
        self.loop = loop
        self.callback = callback
        self.prefix = prefix
        self.queue: "asyncio.Queue[Optional[Tuple[Any, ...]]]" = asyncio.Queue()
        self.task = loop.create_task(self._run()) if callback is not None else None

    def post(self, *args: Any) -> None:
        """Thread-safe: queue one event (called from the worker thread)."""
        if self.callback is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, self.prefix + args)

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            try:
                result = self.callback(*item)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                warnings.warn(f"progress callback raised {type(exc).__name__}: {exc}",
                              RuntimeWarning)

    async def close(self) -> None:
        """Waits until every queued event has been delivered."""
        if self.task is not None:
            self.queue.put_nowait(None)
            await self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def _run_cancellable(fn: Callable[[threading.Event], Any]) -> Any:
    """Runs fn(cancel_event) in a worker thread. If the awaiting task is
    cancelled, the event is set (the engine stops at its next chunk) and the
    thread is waited for before CancelledError propagates, so no work goes on
    behind the caller's back."""
    cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, fn, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        try:
            await future
        except BaseException:
            pass
        raise


class AsyncArrowQuantV2:
    """The first version's asyncio API. Every call runs the engine in a
    worker thread, so the event loop stays responsive; cancelling the task
    stops the run at the next chunk (an interrupted output can be finished
    with ``arrowquant.quantize(..., resume=True)``)."""

    def __init__(self, mode: str = "diffusion", max_concurrent: int = 1) -> None:
        self._sync = ArrowQuantV2(mode)
        if max_concurrent < 1:
            raise ConfigurationError(f"max_concurrent must be at least 1, got {max_concurrent}")
        # The engine already uses every core for one model: by default models run one after another.
        self.max_concurrent = max_concurrent

    @property
    def mode(self) -> str:
        return self._sync.mode

    async def quantize_diffusion_model_async(
            self, model_path: PathLike, output_path: PathLike, config: Optional[Any] = None,
            progress_callback: Optional[Callable[[str, float], Any]] = None) -> Dict[str, Any]:
        """quantize_diffusion_model off the event loop; `progress_callback`
        may be a plain function or an ``async def`` (awaited, in order)."""
        pump = _CallbackPump(asyncio.get_running_loop(), progress_callback)
        try:
            result = await _run_cancellable(
                lambda cancel: self._sync.quantize_diffusion_model(
                    model_path, output_path, config, pump.post if progress_callback else None,
                    cancel=cancel))
        except BaseException:
            pump.cancel()
            raise
        await pump.close()
        return result

    async def quantize_multiple_models_async(
            self, models: Union[Sequence[Any], Mapping[str, Any]],
            progress_callback: Optional[Callable[[int, str, float], Any]] = None,
            return_exceptions: bool = False) -> List[Any]:
        """Quantizes several models; `models` is a list of
        ``{"model_path", "output_path", "config"?}`` dicts or
        ``(model_path, output_path[, config])`` tuples, or a dict
        {model_path: output_path}. The callback gets ``(model_index, message,
        fraction)``. Results come back in input order; with
        `return_exceptions` a failed model's entry is its exception instead of
        the first failure being raised."""
        jobs = _normalize_jobs(models)
        loop = asyncio.get_running_loop()
        pump = _CallbackPump(loop, progress_callback)
        sem = asyncio.Semaphore(self.max_concurrent)

        async def one(index: int, model_path: Any, output_path: Any, config: Any) -> Any:
            async with sem:
                post = (lambda m, f: pump.post(index, m, f)) if progress_callback else None
                return await _run_cancellable(
                    lambda cancel: self._sync.quantize_diffusion_model(
                        model_path, output_path, config, post, cancel=cancel))

        tasks = [asyncio.ensure_future(one(i, *job)) for i, job in enumerate(jobs)]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            pump.cancel()
            raise
        await pump.close()
        return list(results)

    async def validate_quality_async(self, original_path: PathLike,
                                     quantized_path: PathLike) -> Dict[str, Any]:
        """validate_quality off the event loop."""
        return await _run_cancellable(
            lambda cancel: self._sync.validate_quality(original_path, quantized_path))


def _normalize_jobs(models: Any) -> List[Tuple[Any, Any, Any]]:
    if isinstance(models, Mapping):
        return [(k, v, None) for k, v in models.items()]
    jobs = []
    for i, m in enumerate(models):
        if isinstance(m, Mapping):
            try:
                jobs.append((m["model_path"], m["output_path"], m.get("config")))
            except KeyError as exc:
                raise ValidationError(f"models[{i}] lacks {exc.args[0]!r}") from None
        elif isinstance(m, (tuple, list)) and len(m) in (2, 3):
            jobs.append((m[0], m[1], m[2] if len(m) == 3 else None))
        else:
            raise ValidationError(f"models[{i}]: expected a dict with model_path and output_path "
                                  "or a (model_path, output_path[, config]) tuple")
    return jobs


# ---------------------------------------------------------------- SafeTensors


_IMAGE_HINTS = ("down_blocks.", "up_blocks.", "mid_block.", "time_embedding.", "conv_in.",
                "transformer_blocks.", "pos_embed.", "x_embedder.", "t_embedder.", "adaLN")
_AUDIO_HINTS = ("encoder.conv1.", "feature_extractor.", "audio", "mel", "wav2vec", "whisper",
                "encodec", "conv_pos")
_CODE_MODEL_TYPES = ("codegen", "starcoder", "gpt_bigcode", "codellama", "codet5")
_AUDIO_MODEL_TYPES = ("whisper", "wav2vec2", "hubert", "encodec", "musicgen", "bark",
                      "speecht5", "seamless_m4t")


class ShardedSafeTensorsLoader:
    """A SafeTensors model (one file, or an index and its shards) read with the
    C++ reader: tensor_names(), get_tensor(name) as float32 numpy, metadata."""

    def __init__(self, model_path: PathLike) -> None:
        from arrowquant.sources.safetensors import SafeTensorsModel

        self.model_path = Path(model_path)
        self._model = SafeTensorsModel(self.model_path)
        self._infos = {t.name: t for t in self._model.tensors}

    def tensor_names(self) -> List[str]:
        return [t.name for t in self._model.tensors]

    def tensor_info(self, name: str) -> Dict[str, Any]:
        t = self._model.info(name)
        return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "nbytes": t.nbytes,
                "shard": str(self._model.file_of(name))}

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array of its shape (bytes read straight
        into a numpy buffer and converted there; never a Python list)."""
        from arrowquant.engine.dtypes import to_float32

        t = self._model.info(name)
        raw = self._model.read_tensor(name)
        if t.is_float:
            arr = to_float32(raw, t.dtype)
        else:
            np_type = {"float64": np.float64, "int64": np.int64, "int32": np.int32,
                       "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                       "bool": np.bool_}[t.dtype]
            arr = raw.view(np_type).astype(np.float32)
        return arr.reshape(t.shape)

    def num_shards(self) -> int:
        return len(self._model.files)

    def shard_files(self) -> List[str]:
        return [str(p) for p in self._model.files]

    def get_total_size(self) -> int:
        """Bytes of tensor data over all shards (the index's total_size)."""
        return sum(t.nbytes for t in self._model.tensors)

    @property
    def metadata(self) -> Dict[str, Any]:
        return dict(self._model.metadata or {})

    def detect_modality(self) -> str:
        """"text", "code", "image" or "audio": metadata.json's modality, else
        config.json / model_index.json, else the tensor names, else "text"."""
        root = self.model_path if self.model_path.is_dir() else self.model_path.parent
        for meta in (root / "metadata.json",):
            if meta.is_file():
                try:
                    m = json.loads(meta.read_text()).get("modality")
                except (ValueError, AttributeError):
                    m = None
                if m in ("text", "code", "image", "audio"):
                    return m
        for parent in (root, root.parent):
            if (parent / "model_index.json").is_file():
                idx = json.loads((parent / "model_index.json").read_text())
                cls = str(idx.get("_class_name", "")).lower()
                return "audio" if "audio" in cls else "image"
        cfg_path = root / "config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except ValueError:
                cfg = {}
            model_type = str(cfg.get("model_type", "")).lower()
            cls_name = str(cfg.get("_class_name", ""))
            if cls_name:  # diffusers components carry _class_name
                return "audio" if "audio" in cls_name.lower() else "image"
            if model_type in _CODE_MODEL_TYPES:
                return "code"
            if model_type in _AUDIO_MODEL_TYPES:
                return "audio"
        names = self.tensor_names()
        if any(h in n for n in names for h in _IMAGE_HINTS):
            return "image"
        if any(h in n.lower() for n in names for h in _AUDIO_HINTS):
            return "audio"
        return "text"

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> "ShardedSafeTensorsLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos


def load_sharded_safetensors(model_path: PathLike,
                             names: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Every tensor (or those in `names`) of a SafeTensors model as float32 numpy arrays."""
    with ShardedSafeTensorsLoader(model_path) as loader:
        return {n: loader.get_tensor(n) for n in (names or loader.tensor_names())}


__all__ = [
    "ArrowQuantV2", "AsyncArrowQuantV2", "DiffusionQuantConfig", "ShardedSafeTensorsLoader",
    "quantize_diffusion_model", "load_sharded_safetensors", "QuantizationError",
    "ConfigurationError", "ValidationError", "ModelNotFoundError", "ShapeMismatchError",
    "CancelledError",
]
