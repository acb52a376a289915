"""One-call loading of quantized transformers models and diffusers pipelines.

The architecture is built from the config the quantizer copied next to the
weights, with every parameter on the ``meta`` device (no float weight is
allocated: parameters are moved to meta as they are registered, before any
initializer touches them; small buffers such as rotary frequencies are
computed as usual). Then, module by module:

* an ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` whose weight the file
  stores quantized becomes a QuantLinear / QuantConv2d / QuantEmbedding
  holding the packed weight (read one tensor at a time with the lazy V2
  reader, ``arrowquant.load(...).raw(name)``);
* every other tensor is read from the file: unquantized ones as stored,
  cast to the model dtype when floating point; a quantized tensor that no
  packed layer can hold (e.g. a 1-D norm weight written with --quantize-1d,
  or a bare nn.Parameter) is dequantized, and the report names it;
* tied weights (an output projection sharing the input embedding) share
  the packed buffers.

Peak resident memory while loading is the packed model plus the tensor
being read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import FormatError, ModelNotFoundError, ShapeMismatchError
from ..formats.v2_reader import QuantizedModel
from ..formats.v2_schema import INDEX_NAME
from .layers import QuantConv2d, QuantEmbedding, QuantLinear, equalization_scales

PathLike = Any


@dataclass
class LoadReport:
    """What a loader did with each tensor of the file."""

    packed: List[str] = field(default_factory=list)        # modules now holding packed weights
    loaded: List[str] = field(default_factory=list)        # tensors read as stored
    dequantized: List[str] = field(default_factory=list)   # quantized tensors held as float
    tied: List[str] = field(default_factory=list)          # parameters sharing another's storage
    unused: List[str] = field(default_factory=list)        # file tensors the model has no place for


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside is moved to the meta device at
    registration (module initializers then run on meta tensors: no float
    weight memory is touched). Buffers stay where they are created."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[assignment]


def _open(path: PathLike) -> QuantizedModel:
    if isinstance(path, QuantizedModel):
        return path
    return QuantizedModel(path)


def _read(qmodel: QuantizedModel, name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A tensor of the file as torch (its own memory): floating point cast
    to `dtype` (None: as stored), integers and bools as stored."""
    values = qmodel.dequantize(name)
    t = torch.from_numpy(np.array(values, copy=True))
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bias(qmodel: QuantizedModel, module_name: str, mod: nn.Module,
          dtype: torch.dtype) -> Optional[torch.Tensor]:
    if getattr(mod, "bias", None) is None:
        return None
    bname = _full(module_name, "bias")
    if bname not in qmodel.entries:
        raise FormatError(f"{qmodel.root}: tensor {bname!r} is missing (the model's layer "
                          f"{module_name!r} has a bias)")
    return _read(qmodel, bname, dtype)


def _packed_layer(qmodel: QuantizedModel, name: str, mod: nn.Module,
                  dtype: torch.dtype) -> Optional[nn.Module]:
    """The packed replacement of `mod` when the file holds its weight quantized."""
    wname = _full(name, "weight")
    entry = qmodel.entries.get(wname)
    if entry is None or entry.quant_type == "none":
        return None
    if entry.code_levels is not None:
        # The packed kernels decode uniform codes only: a code grid weight
        # (FORMAT.md section 10) is loaded dequantized into the float layer.
        return None
    shape = tuple(entry.shape)
    if isinstance(mod, nn.Linear) and len(shape) == 2:
        if shape != (mod.out_features, mod.in_features):
            raise ShapeMismatchError(f"{qmodel.root}: tensor {wname!r} has shape {shape}, the "
                                     f"model's layer ({mod.out_features}, {mod.in_features})")
        return QuantLinear.from_quantized(qmodel.raw(wname), bias=_bias(qmodel, name, mod, dtype),
                                          input_scales=equalization_scales(entry), dtype=dtype)
    if isinstance(mod, nn.Conv2d) and len(shape) == 4:
        return QuantConv2d.from_quantized(qmodel.raw(wname), mod,
                                          bias=_bias(qmodel, name, mod, dtype),
                                          input_scales=equalization_scales(entry), dtype=dtype)
    if isinstance(mod, nn.Embedding) and len(shape) == 2 and mod.max_norm is None:
        if shape != (mod.num_embeddings, mod.embedding_dim):
            raise ShapeMismatchError(f"{qmodel.root}: tensor {wname!r} has shape {shape}, the "
                                     f"model's embedding ({mod.num_embeddings}, "
                                     f"{mod.embedding_dim})")
        return QuantEmbedding.from_quantized(qmodel.raw(wname), padding_idx=mod.padding_idx,
                                             input_scales=equalization_scales(entry), dtype=dtype)
    return None


def populate(model: nn.Module, path: PathLike, dtype: Optional[torch.dtype] = None) -> LoadReport:
    """Fills `model` (parameters on meta or anywhere) from the V2 directory
    `path`: packed layers where the file has quantized Linear / Conv2d /
    Embedding weights, every other tensor read. Raises FormatError naming
    the parameters the file does not provide."""
    from ..run.buffers import lean_allocators

    dtype = dtype or torch.float32
    report = LoadReport()
    used = set()
    # The reader is opened inside: its Parquet files then allocate from the
    # system pool, which returns freed read buffers to the OS (a caching pool
    # would keep about a quarter of the bytes read resident).
    with lean_allocators():
        qmodel = _open(path)
        # id(original parameter) -> (that parameter, kept alive so the id stays
        # unique, and what replaced it): finds tied weights.
        packed: Dict[int, Tuple[nn.Parameter, nn.Module]] = {}
        for name, mod in list(model.named_modules()):
            new = _packed_layer(qmodel, name, mod, dtype)
            if new is None:
                continue
            packed[id(mod.weight)] = (mod.weight, new)
            _set_submodule(model, name, new)
            report.packed.append(name)
            used.update({_full(name, "weight"), _full(name, "bias")})
        # Linear layers tied to a packed weight (e.g. lm_head = embed_tokens) share it.
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, nn.Linear) or _full(name, "weight") in qmodel.entries:
                continue
            src = packed.get(id(mod.weight), (None, None))[1]
            if src is None or (src.rows, src.cols) != (mod.out_features, mod.in_features):
                continue
            layer = QuantLinear(mod.in_features, mod.out_features, src.bits, src.group_size,
                                bias=False, device="meta", param_dtype=src.param_dtype,
                                has_input_scales=src.input_scales is not None,
                                param_code_bits=src.param_code_bits or None,
                                superblock_groups=src.superblock_groups or None)
            layer._share_packed(src)
            layer.bias = None if mod.bias is None else nn.Parameter(
                _bias(qmodel, name, mod, dtype), requires_grad=False)
            _set_submodule(model, name, layer)
            report.tied.append(_full(name, "weight"))
        # Everything else, read as stored.
        loaded: Dict[int, Tuple[nn.Parameter, nn.Parameter]] = {}
        for mname, mod in model.named_modules():
            if isinstance(mod, (QuantLinear, QuantConv2d, QuantEmbedding)):
                continue
            for pname, p in list(mod._parameters.items()):
                full = _full(mname, pname)
                if p is None or full not in qmodel.entries:
                    continue
                value = _read(qmodel, full, dtype if p.is_floating_point() else None)
                if tuple(value.shape) != tuple(p.shape):
                    raise ShapeMismatchError(f"{qmodel.root}: tensor {full!r} has shape "
                                             f"{tuple(value.shape)}, the model's "
                                             f"{tuple(p.shape)}")
                new_p = nn.Parameter(value, requires_grad=False)
                mod._parameters[pname] = new_p
                loaded[id(p)] = (p, new_p)
                used.add(full)
                kind = report.dequantized if qmodel.entries[full].quant_type != "none" \
                    else report.loaded
                kind.append(full)
            for bname, b in list(mod._buffers.items()):
                full = _full(mname, bname)
                if b is None or full not in qmodel.entries:
                    continue
                value = _read(qmodel, full, b.dtype if b.is_floating_point() else None)
                mod._buffers[bname] = value.reshape(b.shape) if value.numel() == b.numel() \
                    else value
                used.add(full)
                report.loaded.append(full)
        # Tied parameters the file stores once.
        missing = []
        for mname, mod in model.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                shared = loaded.get(id(p), (None, None))[1]
                if shared is not None:
                    mod._parameters[pname] = shared
                    report.tied.append(_full(mname, pname))
                else:
                    missing.append(_full(mname, pname))
    qmodel.close()
    if missing:
        raise FormatError(f"{qmodel.root}: the model's parameter(s) {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} are not in the file")
    report.unused = sorted(n for n in qmodel.entries if n not in used)
    model.eval()
    model.requires_grad_(False)
    model._arrowquant_report = report  # type: ignore[attr-defined]
    return report


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - needs the optional extra
        raise ImportError("loading a transformers model needs transformers: "
                          "pip install transformers") from exc
    return transformers


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - needs the optional extra
        raise ImportError("loading a diffusers pipeline needs diffusers: "
                          "pip install diffusers") from exc
    return diffusers


def _config(root: Path) -> Dict[str, Any]:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise ModelNotFoundError(f"{root}: no config.json (the quantizer copies the source's "
                                 "config next to the weights; quantize the model directory)")
    from ..jsonfile import CONFIG_SCHEMA, read_json

    return read_json(cfg, CONFIG_SCHEMA)


def load_model(path: PathLike, *, dtype: Optional[torch.dtype] = None,
               model_class: Any = None) -> nn.Module:
    """A quantized transformers model directory as a ready model (eval mode):
    the class named by config.json's "architectures" (or `model_class`, or
    AutoModel), built on meta, filled by `populate`. `dtype` (default
    float32) is the dtype of the unquantized float tensors and of the
    packed layers' outputs for float32 inputs."""
    transformers = _transformers()
    root = Path(path)
    arch = (_config(root).get("architectures") or [None])[0]
    config = transformers.AutoConfig.from_pretrained(str(root))
    cls = model_class or (getattr(transformers, arch, None) if arch else None)
    with parameters_on_meta():
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    populate(model, root, dtype)
    return model


def load_component(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                   model_class: Any = None) -> nn.Module:
    """One quantized pipeline component (a V2 directory with its config):
    a diffusers model (config "_class_name") or a transformers one
    ("architectures", e.g. the CLIP text encoder)."""
    root = Path(path)
    config = _config(root)
    if "_class_name" not in config:
        return load_model(root, dtype=dtype, model_class=model_class)
    diffusers = _diffusers()
    cls = model_class or getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise FormatError(f"{root / 'config.json'}: diffusers has no class "
                          f"{config['_class_name']!r}")
    with parameters_on_meta():
        model = cls.from_config(config)
    populate(model, root, dtype)
    return model


def is_quantized_dir(path: Path) -> bool:
    return (path / "model.parquet").is_file() or (path / INDEX_NAME).is_file()


def load_pipeline(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                  pipeline_class: Any = None, **kwargs: Any) -> Any:
    """A quantized diffusers pipeline directory (model_index.json, one V2
    directory per component with weights, the rest copied) as a ready
    pipeline: every quantized component through `load_component`, the
    others (tokenizer, scheduler, ...) by diffusers from their folders.
    Extra keyword arguments go to the pipeline's from_pretrained."""
    diffusers = _diffusers()
    root = Path(path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(f"{root}: no model_index.json: not a diffusers pipeline")
    from ..jsonfile import MODEL_INDEX_SCHEMA, read_json

    index = read_json(index_file, MODEL_INDEX_SCHEMA)
    cls = pipeline_class or getattr(diffusers, index.get("_class_name", ""), None) or \
        diffusers.DiffusionPipeline
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        if name in kwargs:
            continue
        folder = root / name
        if folder.is_dir() and is_quantized_dir(folder):
            components[name] = load_component(folder, dtype=dtype)
    return cls.from_pretrained(str(root), **components, **kwargs)


__all__ = ["load_model", "load_component", "load_pipeline", "populate", "parameters_on_meta",
           "LoadReport", "is_quantized_dir"]
