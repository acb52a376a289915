"""Calibration across diffusion timesteps: per-input-channel activation
statistics of every Linear and Conv2d layer, recorded separately for each
group of timesteps, and the loader that turns them into importance.

torch, diffusers and transformers are optional extras, imported only when
`calibrate` runs; `load_stats` needs only pyarrow and numpy.

Statistics file (docs/calibration-stats.md): Parquet, one row per (layer,
time_group) with count, mean, mean_sq and absmax per input channel, and the
calibration settings in the file's key-value metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import FormatError, ModelNotFoundError, ValidationError

FORMAT_NAME = "calibration-stats"
FORMAT_VERSION = 1
META_KEY = b"arrowquant.calibration"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000

#: Calibration sentences for text encoders (used when no inputs are given).
DEFAULT_SENTENCES: Tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She finished the marathon in just under four hours.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The museum will be closed for renovations until next spring.",
    "Can you recommend a good book about the history of mathematics?",
    "The train to Berlin departs from platform seven at noon.",
    "Researchers discovered a new species of frog in the rainforest.",
    "My laptop battery drains much faster than it used to.",
    "The children built a sandcastle near the water's edge.",
    "Quantum computers exploit superposition and entanglement.",
    "He apologized for arriving late to the meeting.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Heavy rain caused flooding in several coastal towns.",
    "Please remember to water the plants while I am away.",
    "The new smartphone features a faster processor and a better camera.",
    "A group of tourists is taking photos in front of the cathedral.",
    "Vaccines train the immune system to recognize pathogens.",
    "The software update fixed a bug that crashed the application.",
    "Two dogs are chasing a ball across the park.",
    "The committee approved the budget after a long debate.",
    "Mount Everest is the highest mountain above sea level.",
    "I prefer tea to coffee in the morning.",
    "The detective examined the footprints outside the window.",
    "Electric cars are becoming more affordable every year.",
    "The chef sliced the onions and tossed them into the pan.",
    "Ancient Rome was connected by an extensive network of roads.",
    "The baby laughed when the puppy licked her hand.",
    "Our flight was delayed because of a snowstorm in Chicago.",
    "Machine learning models need large amounts of training data.",
    "The farmer harvested the wheat before the storm arrived.",
    "A woman is reading a newspaper on a park bench.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "He repaired the bicycle's flat tire in ten minutes.",
    "The library offers free language classes on weekends.",
    "Solar panels convert sunlight directly into electricity.",
    "The students argued about the meaning of the poem.",
    "A cat is sleeping on a sunny windowsill.",
    "The company reported record profits in the third quarter.",
    "Regular exercise improves both physical and mental health.",
    "The bridge was designed to withstand strong earthquakes.",
    "She painted the fence white over the weekend.",
    "The astronauts returned safely after six months in orbit.",
    "How do I reset my password if I forgot my email address?",
    "The river winds through the valley toward the sea.",
    "The jury reached a unanimous verdict after three days.",
    "A young boy is flying a red kite on the beach.",
    "Inflation has made groceries noticeably more expensive.",
    "The hikers followed the trail up to the glacier.",
    "This restaurant serves the best pizza in town.",
    "The spacecraft captured detailed images of Jupiter's moons.",
    "He plays chess online with friends from around the world.",
    "The hospital opened a new wing for pediatric care.",
    "Bees play a crucial role in pollinating crops.",
    "The concert tickets sold out within minutes.",
    "A chef is preparing sushi in a busy kitchen.",
    "The old castle stands on a hill overlooking the village.",
    "Learning a second language can be challenging but rewarding.",
    "The storm knocked down power lines across the region.",
    "Two men are loading boxes into a delivery truck.",
    "The scientist calibrated the instrument before the experiment.",
    "We watched the sunset from the top of the lighthouse.",
)


# --------------------------------------------------------------------------
# time groups


def time_group(timestep: float, num_train_timesteps: int, num_time_groups: int) -> int:
    """Group of a timestep: num_time_groups equal groups over
    [0, num_train_timesteps); t is floored, clamped into the range."""
    t = int(math.floor(float(timestep)))
    t = min(max(t, 0), num_train_timesteps - 1)
    return min(num_time_groups - 1, t * num_time_groups // num_train_timesteps)


def time_group_ranges(num_train_timesteps: int, num_time_groups: int) -> List[List[int]]:
    """[first, last] timestep (inclusive) of every group, per time_group()."""
    out = []
    for g in range(num_time_groups):
        lo = -(-g * num_train_timesteps // num_time_groups)
        hi = -(-(g + 1) * num_train_timesteps // num_time_groups) - 1
        out.append([lo, min(hi, num_train_timesteps - 1)])
    return out


# --------------------------------------------------------------------------
# calibration input files of the first version


@dataclass
class CalibrationInput:
    """One model input: data reshaped to `shape`, at diffusion `timestep`."""

    data: np.ndarray
    timestep: int


def read_calibration_inputs(path: Union[str, Path]) -> List[CalibrationInput]:
    """Reads JSONL ({"data": [...], "timestep": t, "shape": [...]} per line),
    Parquet or Arrow IPC (file or stream) with columns data list<float32>,
    timestep int64, shape list<int64>."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"calibration inputs {str(p)!r} do not exist")
    suffix = p.suffix.lower()
    records: List[CalibrationInput] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(p, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    records.append(_record(doc["data"], doc.get("timestep", 0), doc.get("shape"),
                                           f"{p.name}:{lineno}"))
                except (KeyError, TypeError, json.JSONDecodeError) as exc:
                    raise FormatError(f"{p.name}:{lineno}: not a calibration record ({exc})") from None
        return records
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
    elif suffix in (".arrow", ".ipc", ".feather", ".arrows"):
        try:
            with pa.memory_map(str(p), "r") as src:
                table = pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(p), "r") as src:
                table = pa.ipc.open_stream(src).read_all()
    else:
        raise FormatError(
            f"calibration inputs {p.name!r}: expected .jsonl, .parquet or .arrow/.ipc, or a .txt "
            "file of sentences")
    if "data" not in table.column_names:
        raise FormatError(f"{p.name}: no 'data' column (columns: {table.column_names})")
    data = table.column("data").to_pylist()
    ts = table.column("timestep").to_pylist() if "timestep" in table.column_names else [0] * len(data)
    shapes = table.column("shape").to_pylist() if "shape" in table.column_names else [None] * len(data)
    for i, (d, t, s) in enumerate(zip(data, ts, shapes)):
        records.append(_record(d, t, s, f"{p.name} row {i}"))
    return records


def _record(data: Sequence[float], timestep: Any, shape: Optional[Sequence[int]], where: str
            ) -> CalibrationInput:
    arr = np.asarray(data, dtype=np.float32)
    if shape is not None:
        shape = [int(v) for v in shape]
        if int(np.prod(shape)) != arr.size:
            raise FormatError(f"{where}: shape {shape} needs {int(np.prod(shape))} values, "
                              f"data has {arr.size}")
        arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise FormatError(f"{where}: data contains NaN or Inf")
    return CalibrationInput(data=arr, timestep=int(timestep if timestep is not None else 0))


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


def _list_array(vectors: List[np.ndarray]):
    """list<float32> from numpy vectors without a Python loop per value."""
    import pyarrow as pa

    sizes = np.array([v.size for v in vectors], dtype=np.int32)
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    flat = (np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
            if vectors else np.zeros(0, dtype=np.float32))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))


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
    with open(p, "r", encoding="utf-8") as f:
        return json.load(f)


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


def write_stats(table: Any, out_path: Union[str, Path], meta: Dict[str, Any]) -> Path:
    """Writes the statistics table with its metadata (atomically: a temporary
    name in the same folder, renamed when complete)."""
    import os

    import pyarrow.parquet as pq

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    kv = dict(table.schema.metadata or {})
    kv[META_KEY] = json.dumps(meta).encode("utf-8")
    kv[b"arrowquant.format"] = FORMAT_NAME.encode()
    kv[b"arrowquant.format_version"] = str(FORMAT_VERSION).encode()
    table = table.replace_schema_metadata(kv)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, write_statistics=["layer", "time_group", "count"])
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# --------------------------------------------------------------------------
# loading


@dataclass
class GroupStats:
    count: int
    mean: np.ndarray
    mean_sq: np.ndarray
    absmax: np.ndarray


@dataclass
class CalibrationStats:
    """Per-layer, per-time-group activation statistics (see load_stats)."""

    groups: Dict[str, Dict[int, GroupStats]]
    num_time_groups: int
    metadata: Dict[str, Any] = field(default_factory=dict)
    module_types: Dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> List[str]:
        return sorted(self.groups)

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def resolve(self, name: str) -> Optional[str]:
        """The stats layer for a weight name: exact, else the unique layer
        whose name ends with it or that ends with it on a dot boundary
        (state dicts saved with or without a prefix such as "model.")."""
        if name in self.groups:
            return name
        hits = [k for k in self.groups if k.endswith("." + name) or name.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def _get(self, name: str) -> Dict[int, GroupStats]:
        key = self.resolve(name)
        if key is None:
            raise KeyError(f"no calibration statistics for {name!r}")
        return self.groups[key]

    def group_stats(self, name: str) -> Dict[int, GroupStats]:
        return self._get(name)

    def mean_sq(self, name: str) -> np.ndarray:
        """Pooled E[x^2] over all time groups (count-weighted)."""
        gs = self._get(name)
        total = sum(g.count for g in gs.values())
        acc = sum(g.mean_sq.astype(np.float64) * g.count for g in gs.values())
        return (acc / max(total, 1)).astype(np.float32)

    def act_absmax(self, name: str) -> np.ndarray:
        """Activation absmax per input channel over all time groups."""
        gs = self._get(name)
        return np.max(np.stack([g.absmax for g in gs.values()]), axis=0).astype(np.float32)

    def importance(self, name: str, mode: str = "max", floor: float = 1e-3) -> np.ndarray:
        """Per-input-channel importance that ignores no time group's channels.

        mode "max" (default): each group's E[x_c^2] is divided by its mean over
        channels (so every timestep group counts on the same scale, whatever
        the activation energy at that noise level), and the importance of a
        channel is its largest normalized value over the groups: a channel
        that is salient at any timestep stays salient. mode "mean": the
        pooled, count-weighted E[x_c^2] (what one group of all timesteps
        would give). Either way values are floored at `floor` times their
        mean, so that no channel's error is ignored entirely."""
        gs = self._get(name)
        if mode == "mean":
            imp = self.mean_sq(name).astype(np.float64)
        elif mode == "max":
            parts = []
            for g in gs.values():
                m = g.mean_sq.astype(np.float64)
                mu = float(m.mean())
                if mu > 0:
                    parts.append(m / mu)
            if not parts:
                return np.ones_like(next(iter(gs.values())).mean_sq, dtype=np.float32)
            imp = np.max(np.stack(parts), axis=0)
        else:
            raise ValidationError(f"importance mode must be 'max' or 'mean', got {mode!r}")
        mu = float(imp.mean())
        if mu <= 0:
            return np.ones_like(imp, dtype=np.float32)
        return np.maximum(imp, floor * mu).astype(np.float32)

    def activation_stats_json(self, name: str) -> str:
        """Compact summary for the activation_stats_json column."""
        gs = self._get(name)
        imp = self.importance(name)
        absmax = self.act_absmax(name)
        msq = self.mean_sq(name)
        top = np.argsort(-imp, kind="stable")[:8]
        doc = {
            "source": "calibration",
            "layer": self.resolve(name),
            "channels": int(imp.size),
            "count": int(sum(g.count for g in gs.values())),
            "time_groups": sorted(int(k) for k in gs),
            "absmax_max": float(absmax.max()),
            "mean_sq_mean": float(msq.mean()),
            "importance": "max over time groups of group-normalized mean_sq",
            "importance_max_over_median": float(imp.max() / max(float(np.median(imp)), 1e-30)),
            "top_channels": [int(i) for i in top],
        }
        return json.dumps(doc, separators=(",", ":"))

    def time_aware_json(self, name: str) -> str:
        """Time-aware settings for the time_aware_quant_json column."""
        gs = self._get(name)
        keys = sorted(gs)
        doc = {
            "num_time_groups": self.num_time_groups,
            "num_train_timesteps": self.metadata.get("num_train_timesteps"),
            "time_group_ranges": self.metadata.get("time_group_ranges"),
            "groups_seen": keys,
            "group_counts": [int(gs[k].count) for k in keys],
            "group_mean_sq": [float(gs[k].mean_sq.mean()) for k in keys],
            "group_absmax": [float(gs[k].absmax.max()) for k in keys],
            "combine": "max over time groups of mean_sq / mean_c(mean_sq)",
        }
        return json.dumps(doc, separators=(",", ":"))


def load_stats(path: Union[str, Path]) -> CalibrationStats:
    """Reads a statistics file written by calibrate()."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"calibration statistics {str(p)!r} do not exist")
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several classes for a bad file
        raise FormatError(f"{p}: not a Parquet statistics file ({exc})") from None
    kv = table.schema.metadata or {}
    if META_KEY not in kv:
        raise FormatError(f"{p}: no {META_KEY.decode()} metadata; not written by arrowquant "
                          "calibrate")
    meta = json.loads(kv[META_KEY].decode("utf-8"))
    need = {"layer", "time_group", "count", "mean", "mean_sq", "absmax"}
    missing = need - set(table.column_names)
    if missing:
        raise FormatError(f"{p}: missing columns {sorted(missing)}")
    groups: Dict[str, Dict[int, GroupStats]] = {}
    types: Dict[str, str] = {}
    cols = {c: table.column(c) for c in need}
    layer = cols["layer"].to_pylist()
    tg = cols["time_group"].to_pylist()
    cnt = cols["count"].to_pylist()
    mt = table.column("module_type").to_pylist() if "module_type" in table.column_names else None
    for i in range(table.num_rows):
        vals = [np.asarray(cols[c][i].values.to_numpy(zero_copy_only=False), dtype=np.float32)
                for c in ("mean", "mean_sq", "absmax")]
        if not (vals[0].size == vals[1].size == vals[2].size):
            raise FormatError(f"{p}: row {i} ({layer[i]!r}): mean, mean_sq and absmax lengths "
                              "differ")
        groups.setdefault(layer[i], {})[int(tg[i])] = GroupStats(int(cnt[i]), *vals)
        if mt is not None:
            types[layer[i]] = mt[i]
    return CalibrationStats(groups=groups, num_time_groups=int(meta.get("num_time_groups") or 1),
                            metadata=meta, module_types=types)
