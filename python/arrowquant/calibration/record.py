"""Recording activation statistics with torch: forward pre-hooks on every
Linear / Conv2d, the diffusers and transformers models to run, and the
sampling loops across timesteps. torch, diffusers and transformers are
imported only inside the functions that need them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ModelNotFoundError, ValidationError
from .inputs import DEFAULT_SENTENCES, CalibrationInput, read_calibration_inputs
from .stats import (DEFAULT_NUM_TRAIN_TIMESTEPS, FORMAT_NAME, FORMAT_VERSION, _list_array,
                    time_group, time_group_ranges, write_stats)


# --------------------------------------------------------------------------
# recording


class StatsRecorder:
    """Forward pre-hooks on every nn.Linear and nn.Conv2d of a module that
    accumulate, per input channel and per time group: count, sum, sum of
    squares (float64) and absolute max. Set `.group` before each forward."""

    def __init__(self, model: Any, num_time_groups: int):
        import torch

        self.num_time_groups = num_time_groups
        self.group = 0
        self.layers: Dict[str, Dict[str, Any]] = {}
        self._handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                kind, channels, groups = "linear", mod.in_features, 1
            elif isinstance(mod, torch.nn.Conv2d):
                kind, channels, groups = "conv2d", mod.in_channels, mod.groups
            else:
                continue
            key = f"{name}.weight" if name else "weight"
            cols = channels // groups
            self.layers[key] = {
                "kind": kind, "channels": cols, "groups": groups,
                "count": torch.zeros(num_time_groups, dtype=torch.int64),
                "sum": torch.zeros(num_time_groups, cols, dtype=torch.float64),
                "sum_sq": torch.zeros(num_time_groups, cols, dtype=torch.float64),
                "absmax": torch.zeros(num_time_groups, cols, dtype=torch.float32),
            }
            self._handles.append(mod.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key: str) -> Callable:
        def hook(module: Any, args: Tuple[Any, ...]) -> None:
            import torch

            if not args or not torch.is_tensor(args[0]):
                return
            acc = self.layers[key]
            x = args[0].detach().to(torch.float64)
            if acc["kind"] == "linear":
                x = x.reshape(-1, x.shape[-1])                      # (N, in)
                dims: Tuple[int, ...] = (0,)
            else:
                if x.dim() == 3:                                    # unbatched (C, H, W)
                    x = x.unsqueeze(0)
                # (B, groups, cols, H, W): a grouped conv's groups fold onto
                # the weight's columns (cols = in_channels / groups).
                x = x.reshape(x.shape[0], acc["groups"], acc["channels"], -1)
                dims = (0, 1, 3)
            n = x.numel() // acc["channels"]
            grp = self.group
            acc["count"][grp] += n
            acc["sum"][grp] += x.sum(dim=dims)
            acc["sum_sq"][grp] += (x * x).sum(dim=dims)
            acc["absmax"][grp] = torch.maximum(acc["absmax"][grp],
                                               x.abs().amax(dim=dims).to(torch.float32))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def table(self):
        """The statistics as a pyarrow Table (rows with count > 0 only)."""
        import pyarrow as pa

        cols: Dict[str, list] = {k: [] for k in ("layer", "module_type", "channels", "time_group",
                                                "count", "mean", "mean_sq", "absmax")}
        for key in sorted(self.layers):
            acc = self.layers[key]
            for g in range(self.num_time_groups):
                n = int(acc["count"][g])
                if n == 0:
                    continue
                cols["layer"].append(key)
                cols["module_type"].append(acc["kind"])
                cols["channels"].append(acc["channels"])
                cols["time_group"].append(g)
                cols["count"].append(n)
                cols["mean"].append((acc["sum"][g] / n).to(dtype=_f32()).numpy())
                cols["mean_sq"].append((acc["sum_sq"][g] / n).to(dtype=_f32()).numpy())
                cols["absmax"].append(acc["absmax"][g].numpy())
        return pa.table({
            "layer": pa.array(cols["layer"], pa.string()),
            "module_type": pa.array(cols["module_type"], pa.string()),
            "channels": pa.array(cols["channels"], pa.int64()),
            "time_group": pa.array(cols["time_group"], pa.int32()),
            "count": pa.array(cols["count"], pa.int64()),
            "mean": _list_array(cols["mean"]),
            "mean_sq": _list_array(cols["mean_sq"]),
            "absmax": _list_array(cols["absmax"]),
        })


def _f32():
    import torch

    return torch.float32


# --------------------------------------------------------------------------
# models


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ValidationError(
            f"calibration needs {module} (pip install 'arrowquant[calibration]' or pip install "
            f"{module})") from None


def _read_json(p: Path) -> Dict[str, Any]:
    """A JSON file of the model, checked (jsonfile): config.json against the
    diffusers / transformers schema, model_index.json against its own."""
    from ..jsonfile import DIFFUSERS_CONFIG_SCHEMA, MODEL_INDEX_SCHEMA, read_json

    schema = {"config.json": DIFFUSERS_CONFIG_SCHEMA,
              "model_index.json": MODEL_INDEX_SCHEMA}.get(p.name, dict)
    return read_json(p, schema)


@dataclass
class _Loaded:
    kind: str                  # "diffusers" or "transformers"
    model: Any
    model_class: str
    scheduler: Any = None
    tokenizer: Any = None
    root: Optional[Path] = None


def _load_model(model_path: Path, scheduler: Optional[str]) -> _Loaded:
    if not model_path.exists():
        raise ModelNotFoundError(f"model {str(model_path)!r} does not exist")
    root = model_path if model_path.is_dir() else model_path.parent
    if (root / "model_index.json").exists():        # a diffusers pipeline directory
        index = _read_json(root / "model_index.json")
        for sub in ("unet", "transformer"):
            if sub in index and (root / sub / "config.json").exists():
                loaded = _load_diffusers(root / sub, scheduler)
                if loaded.scheduler is None or scheduler is None:
                    sched_dir = root / "scheduler"
                    if scheduler is None and (sched_dir / "scheduler_config.json").exists():
                        loaded.scheduler = _scheduler_from_dir(sched_dir)
                return loaded
        raise ValidationError(f"{root}: diffusers pipeline without a unet or transformer folder")
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise ValidationError(f"{root}: no config.json or model_index.json; cannot tell which "
                              "model to run for calibration")
    cfg = _read_json(cfg_path)
    if "_class_name" in cfg:
        return _load_diffusers(root, scheduler)
    if "architectures" in cfg or "model_type" in cfg:
        return _load_transformers(root)
    raise ValidationError(f"{cfg_path}: neither a diffusers (_class_name) nor a transformers "
                          "(architectures / model_type) config")


def _scheduler_from_dir(d: Path) -> Any:
    diffusers = _require("diffusers")
    cfg = _read_json(d / "scheduler_config.json")
    cls = getattr(diffusers, cfg.get("_class_name", "DDPMScheduler"), None)
    if cls is None:
        cls = diffusers.DDPMScheduler
    return cls.from_pretrained(str(d))


def _make_scheduler(name: Optional[str], num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS):
    diffusers = _require("diffusers")
    if name in (None, "ddpm"):
        return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps)
    if name == "ddim":
        return diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps)
    raise ValidationError(f"scheduler must be 'ddpm' or 'ddim', got {name!r}")


def _load_diffusers(d: Path, scheduler: Optional[str]) -> _Loaded:
    diffusers = _require("diffusers")
    cfg = _read_json(d / "config.json")
    name = cfg["_class_name"]
    cls = getattr(diffusers, name, None)
    supported = ("UNet2DModel", "UNet2DConditionModel", "Transformer2DModel",
                 "DiTTransformer2DModel")
    if cls is None or name not in supported:
        raise ValidationError(f"{d}: diffusers class {name!r} is not supported for calibration "
                              f"(supported: {', '.join(supported)})")
    model = cls.from_pretrained(str(d))
    model.eval()
    sched = None
    if scheduler is not None:
        sched = _make_scheduler(scheduler)
    elif (d / "scheduler_config.json").exists():
        sched = _scheduler_from_dir(d)
    elif (d.parent / "scheduler" / "scheduler_config.json").exists():
        sched = _scheduler_from_dir(d.parent / "scheduler")
    if sched is None:
        sched = _make_scheduler(None)
    return _Loaded("diffusers", model, name, scheduler=sched, root=d)


def _load_transformers(d: Path) -> _Loaded:
    transformers = _require("transformers")
    model = transformers.AutoModel.from_pretrained(str(d))
    model.eval()
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError):
        tokenizer = None
    return _Loaded("transformers", model, type(model).__name__, tokenizer=tokenizer, root=d)


# --------------------------------------------------------------------------
# running the models


def _diffusion_kwargs(model: Any, model_class: str, batch: int, gen: Any) -> Dict[str, Any]:
    """Conditioning a diffusers model needs besides sample and timestep:
    random class labels, or random encoder states for cross attention."""
    import torch

    cfg = model.config
    kw: Dict[str, Any] = {}
    if model_class == "UNet2DModel":
        if cfg.get("num_class_embeds") is not None and cfg.get("class_embed_type") is None:
            kw["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (batch,), generator=gen)
    elif model_class == "UNet2DConditionModel":
        if cfg.get("addition_embed_type") is not None:
            raise ValidationError("UNet2DConditionModel with addition_embed_type (SDXL-style "
                                  "added conditions) is not supported for calibration")
        dim = cfg["cross_attention_dim"]
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        kw["encoder_hidden_states"] = torch.randn(batch, 77, int(dim), generator=gen)
        if cfg.get("num_class_embeds") is not None and cfg.get("class_embed_type") is None:
            kw["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (batch,), generator=gen)
    else:  # Transformer2DModel / DiTTransformer2DModel
        n = cfg.get("num_embeds_ada_norm")
        if n is not None:
            kw["class_labels"] = torch.randint(0, int(n), (batch,), generator=gen)
    return kw


def _sample_shape(model: Any, batch: int) -> Tuple[int, ...]:
    cfg = model.config
    size = cfg.get("sample_size") or 32
    if isinstance(size, (list, tuple)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    return (batch, int(cfg.get("in_channels", 4)), h, w)


def _forward_diffusion(model: Any, sample: Any, t: Any, kw: Dict[str, Any]) -> Any:
    import torch

    tt = torch.full((sample.shape[0],), int(t), dtype=torch.long)
    out = model(sample, tt, **kw)
    return out.sample if hasattr(out, "sample") else out[0]


def _run_diffusion_sampling(loaded: _Loaded, rec: StatsRecorder, *, samples: int, steps: int,
                            batch_size: int, seed: int, T: int, G: int) -> List[int]:
    """Random latents through `steps` steps of the scheduler; every forward
    is recorded under the group of its timestep. Returns the timesteps run."""
    import torch

    model, sched = loaded.model, loaded.scheduler
    gen = torch.Generator().manual_seed(seed)
    seen: List[int] = []
    for b0 in range(0, samples, batch_size):
        batch = min(batch_size, samples - b0)
        sched.set_timesteps(steps)
        latents = torch.randn(_sample_shape(model, batch), generator=gen)
        latents = latents * float(getattr(sched, "init_noise_sigma", 1.0))
        kw = _diffusion_kwargs(model, loaded.model_class, batch, gen)
        for t in sched.timesteps:
            rec.group = time_group(float(t), T, G)
            seen.append(int(t))
            with torch.no_grad():
                out = _forward_diffusion(model, sched.scale_model_input(latents, t), t, kw)
            c = latents.shape[1]
            if out.shape[1] == 2 * c and getattr(sched.config, "variance_type", "") not in (
                    "learned", "learned_range"):
                out = out[:, :c]
            latents = sched.step(out, t, latents, generator=gen).prev_sample
    return seen


def _run_diffusion_inputs(loaded: _Loaded, rec: StatsRecorder, records: List[CalibrationInput],
                          *, batch_size: int, seed: int, T: int, G: int) -> List[int]:
    """The model on given inputs (one forward each), batched by time group and shape."""
    import torch

    model = loaded.model
    gen = torch.Generator().manual_seed(seed)
    expected = _sample_shape(model, 1)[1:]
    buckets: Dict[Tuple[int, Tuple[int, ...]], List[CalibrationInput]] = {}
    for r in records:
        d = r.data
        if d.ndim == 4 and d.shape[0] == 1:
            d = d[0]
        if d.ndim != 3 or d.shape[0] != expected[0]:
            raise ValidationError(f"calibration input of shape {list(r.data.shape)} does not fit "
                                  f"a {loaded.model_class} with {expected[0]} input channels "
                                  "(expected [C, H, W] or [1, C, H, W])")
        buckets.setdefault((time_group(r.timestep, T, G), d.shape), []).append(
            CalibrationInput(d, r.timestep))
    seen: List[int] = []
    for (grp, _), items in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for b0 in range(0, len(items), batch_size):
            chunk = items[b0:b0 + batch_size]
            sample = torch.from_numpy(np.stack([c.data for c in chunk]))
            tt = torch.tensor([c.timestep for c in chunk], dtype=torch.long)
            kw = _diffusion_kwargs(model, loaded.model_class, len(chunk), gen)
            rec.group = grp
            seen.extend(int(c.timestep) for c in chunk)
            with torch.no_grad():
                model(sample, tt, **kw)
    return seen


def _run_text(loaded: _Loaded, rec: StatsRecorder, *, sentences: Optional[Sequence[str]],
              records: Optional[List[CalibrationInput]], batch_size: int, max_length: int) -> int:
    """Sentences through the tokenizer and the model, or calibration records
    as token ids (integral data) or input embeddings; all in time group 0."""
    import torch

    model = loaded.model
    rec.group = 0
    n = 0
    with torch.no_grad():
        if sentences is not None:
            if loaded.tokenizer is None:
                raise ValidationError(f"{loaded.root}: no tokenizer found to encode sentences")
            for b0 in range(0, len(sentences), batch_size):
                batch = list(sentences[b0:b0 + batch_size])
                enc = loaded.tokenizer(batch, padding=True, truncation=True,
                                       max_length=max_length, return_tensors="pt")
                model(**enc)
                n += len(batch)
            return n
        assert records is not None
        for r in records:
            d = r.data if r.data.ndim >= 2 else r.data[None, :]
            if np.all(d == np.round(d)):
                model(input_ids=torch.from_numpy(d.astype(np.int64)))
            else:
                if d.ndim == 2:
                    d = d[None]
                model(inputs_embeds=torch.from_numpy(d))
            n += 1
    return n


def calibrate(
    model_path: Union[str, Path],
    out_path: Union[str, Path],
    *,
    num_time_groups: int = 10,
    samples: Optional[int] = None,
    inputs: Optional[Union[str, Path, Sequence[str]]] = None,
    seed: int = 0,
    steps: Optional[int] = None,
    batch_size: int = 8,
    scheduler: Optional[str] = None,
    max_length: int = 128,
    threads: Optional[int] = None,
) -> Path:
    """Runs a model on calibration inputs and writes per-input-channel
    activation statistics of every Linear / Conv2d layer, per time group.

    - diffusers UNet2DModel / UNet2DConditionModel / Transformer2DModel /
      DiTTransformer2DModel (a model folder, or a pipeline folder with unet/ or
      transformer/ and scheduler/): `samples` random latents (default 4) go
      through `steps` steps (default 2 * num_time_groups) of the model's DDPM /
      DDIM scheduler (`scheduler=` overrides); each forward is recorded under
      the group of its timestep.
    - transformers models: `samples` sentences (default: all of
      DEFAULT_SENTENCES, or the lines of a .txt `inputs` file) through the
      tokenizer and the model; everything is time group 0 and the file says
      num_time_groups = 1.
    - `inputs` = a JSONL / Parquet / Arrow IPC calibration file of the first
      version: its records are the model inputs (latents with their timestep
      for diffusers; token ids or input embeddings for text models).
    Returns out_path."""
    torch = _require("torch")
    if not isinstance(num_time_groups, int) or not 1 <= num_time_groups <= 1000:
        raise ValidationError(f"num_time_groups must be an integer from 1 to 1000, got "
                              f"{num_time_groups!r}")
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise ValidationError(f"samples must be a positive integer, got {samples!r}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    model_path = Path(model_path)
    out_path = Path(out_path)
    loaded = _load_model(model_path, scheduler)

    sentences: Optional[List[str]] = None
    records: Optional[List[CalibrationInput]] = None
    inputs_desc: Dict[str, Any]
    if inputs is None:
        inputs_desc = {"kind": "random-latents" if loaded.kind == "diffusers" else "sentences"}
    elif isinstance(inputs, (str, Path)) and Path(inputs).suffix.lower() == ".txt":
        with open(inputs, "r", encoding="utf-8") as f:
            sentences = [ln.strip() for ln in f if ln.strip()]
        inputs_desc = {"kind": "sentences", "file": str(inputs)}
    elif isinstance(inputs, (str, Path)):
        records = read_calibration_inputs(inputs)
        if samples is not None:
            records = records[:samples]
        inputs_desc = {"kind": "calibration-file", "file": str(inputs), "records": len(records)}
    else:
        sentences = [str(s) for s in inputs]
        inputs_desc = {"kind": "sentences"}

    meta: Dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "model": str(model_path), "model_class": loaded.model_class, "model_kind": loaded.kind,
        "seed": seed, "inputs": inputs_desc,
    }
    if loaded.kind == "diffusers":
        T = int(loaded.scheduler.config.num_train_timesteps)
        G = num_time_groups
        rec = StatsRecorder(loaded.model, G)
        try:
            if records is not None:
                seen = _run_diffusion_inputs(loaded, rec, records, batch_size=batch_size,
                                             seed=seed, T=T, G=G)
            else:
                if sentences is not None:
                    raise ValidationError("sentences are calibration inputs for text models; a "
                                          "diffusers model takes random latents or a "
                                          "JSONL/Parquet/Arrow file of latents")
                n = samples if samples is not None else 4
                st = steps if steps is not None else max(2 * G, 10)
                seen = _run_diffusion_sampling(loaded, rec, samples=n, steps=st,
                                               batch_size=batch_size, seed=seed, T=T, G=G)
                inputs_desc.update({"samples": n, "steps": st,
                                    "scheduler": type(loaded.scheduler).__name__})
        finally:
            rec.close()
        meta.update({
            "num_time_groups": G, "num_train_timesteps": T,
            "time_group_ranges": time_group_ranges(T, G),
            "forward_passes": len(seen),
            "timesteps": sorted(set(seen)),
        })
    else:
        rec = StatsRecorder(loaded.model, 1)
        try:
            if records is None and sentences is None:
                sentences = list(DEFAULT_SENTENCES)
            if sentences is not None and samples is not None:
                sentences = sentences[:samples]
            n = _run_text(loaded, rec, sentences=sentences, records=records,
                          batch_size=batch_size, max_length=max_length)
        finally:
            rec.close()
        inputs_desc["samples"] = n
        meta.update({"num_time_groups": 1, "num_train_timesteps": None,
                     "time_group_ranges": None, "forward_passes": n, "timesteps": None})
    write_stats(rec.table(), out_path, meta)
    return out_path
