"""The llama.cpp architecture of a Hugging Face model directory.

From config.json and the source's tensor names this module works out what
llama.cpp's loader needs, the same facts its own converter
(convert_hf_to_gguf.py) writes:

* the llama.cpp architecture (``general.architecture``) and the ``general.*``
  and ``<arch>.*`` hyperparameter keys (context / embedding / feed-forward
  length, block count, head counts, rope base and scaling, norm epsilon,
  vocab size, BERT's pooling type and non-causal attention, ...);
* per tensor: its llama.cpp name, the shape written, a row permutation where
  the converter applies one (Llama-family Q/K: HF stores the two rotary halves
  of each head apart, llama.cpp's ``rope`` wants them interleaved), whether
  llama.cpp needs it in F32, or why it is left out.

Names come from the PyPI ``gguf`` package (``MODEL_ARCH``, ``MODEL_TENSORS``,
``Keys``, ``get_tensor_name_map``) so that new tensor names follow its
updates. What is not in that package, and so is kept here, is which Hugging
Face architecture is which llama.cpp architecture and the per-family
conversion facts (permutation, skipped tensors); :data:`FAMILIES` holds them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...jsonfile import CONFIG_SCHEMA, Opt, check, read_json
from ...errors import ConfigurationError
from ...engine.dtypes import QUANTIZABLE_DTYPES

#: (key, GGUF value type, value) as the C++ writer takes them.
KeyValue = Tuple[str, str, Any]


def _gguf():
    """The PyPI `gguf` package (names and keys); a clear error without it."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency of this path
        raise ConfigurationError(
            "GGUF for llama.cpp (--gguf-arch auto) takes tensor names and metadata keys from the "
            "`gguf` package (pip install gguf); install it, or use --gguf-arch generic") from e
    return gguf


@dataclass(frozen=True)
class Family:
    """How one group of Hugging Face architectures converts (facts read in
    llama.cpp's convert_hf_to_gguf.py / conversion/*.py)."""

    arch: str                      # gguf.MODEL_ARCH member name
    permute_qk: bool = False       # Llama-style rotary row permutation of Q and K
    encoder: bool = False          # BERT-style: non-causal, pooled embeddings
    vocab_size_key: bool = False   # writes <arch>.vocab_size
    rope_dim_key: bool = False     # writes <arch>.rope.dimension_count
    # Source-name prefixes of tensors llama.cpp never reads, with the reason.
    skip_prefixes: Tuple[Tuple[str, str], ...] = ()


_ROTARY_SKIP = (
    (".rotary_emb.inv_freq", "rotary inv_freq buffer: llama.cpp computes the frequencies from "
                             "rope.freq_base"),
)

#: Hugging Face ``architectures[0]`` -> conversion family.
FAMILIES: Dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", permute_qk=True, vocab_size_key=True, rope_dim_key=True),
    "MistralForCausalLM": Family("LLAMA", permute_qk=True, vocab_size_key=True, rope_dim_key=True),
    "Qwen2ForCausalLM": Family("QWEN2"),
    "Qwen3ForCausalLM": Family("QWEN3"),
    "BertModel": Family("BERT", encoder=True, skip_prefixes=(
        ("embeddings.position_ids", "position id buffer (int64): llama.cpp numbers positions "
                                    "itself"),
        ("pooler.", "BERT pooler (dense + tanh on [CLS]): not used for sentence embeddings, "
                    "llama.cpp pools the hidden states (pooling_type)"),
        ("cls.predictions", "masked-LM head: llama.cpp's BERT is an embedding model"),
        ("cls.seq_relationship", "next-sentence head: llama.cpp's BERT is an embedding model"),
    )),
}
FAMILIES["BertForMaskedLM"] = FAMILIES["BertModel"]


@dataclass
class GgufTensor:
    """One source tensor as llama.cpp wants it: what the writer needs.

    ``name`` is None when the tensor is left out (``skip_reason`` says why).
    ``shape`` is the numpy-order shape written. ``row_order`` (when set)
    gives, for each written row of axis 0, the source row it comes from: the
    writer gathers those rows (a permutation, so values are unchanged and an
    F16 source stays F16). ``data`` holds a tensor generated here rather than
    read (llama3 rope frequency factors). ``kind`` is the gguf
    ``MODEL_TENSOR`` role and ``block`` the layer index: what type rules and
    presets key on. ``f32_reason`` is set when llama.cpp needs F32."""

    source: Optional[str]
    name: Optional[str]
    shape: Tuple[int, ...]
    dtype: str
    kind: Any = None
    block: Optional[int] = None
    row_order: Optional[np.ndarray] = None
    transform: Optional[str] = None
    f32_reason: Optional[str] = None
    skip_reason: Optional[str] = None
    data: Optional[np.ndarray] = None


@dataclass
class ArchPlan:
    """Everything the writer needs besides the tensor bytes."""

    arch: str                      # llama.cpp architecture name ("llama", "bert", ...)
    hf_arch: str
    metadata: List[KeyValue]       # general.* (except file_type) and <arch>.* keys
    tensors: List[GgufTensor]      # in source order, generated ones last; skips included
    notes: List[str] = field(default_factory=list)


_INT, _NUM = Opt(int), Opt(float)
_ROPE = {"rope_type": Opt(str), "type": Opt(str), "factor": _NUM, "rope_theta": _NUM,
         "low_freq_factor": _NUM, "high_freq_factor": _NUM,
         "original_max_position_embeddings": _INT}
# What the llama.cpp layout reads of a config.json (jsonfile: a wrong type is
# a MetadataError naming the file and the key, before any value is used).
LLM_CONFIG_SCHEMA = {
    **CONFIG_SCHEMA, "text_config": Opt(dict), "rope_scaling": Opt(_ROPE),
    "rope_parameters": Opt(_ROPE), "is_causal": Opt(bool), "_model_name_or_path": Opt(str),
    **{k: _INT for k in ("head_dim", "hidden_size", "n_embd", "dim", "num_hidden_layers",
                         "n_layer", "num_layers", "intermediate_size", "n_inner",
                         "num_attention_heads", "n_head", "num_key_value_heads", "n_kv_heads",
                         "vocab_size", "type_vocab_size", "max_position_embeddings", "n_ctx",
                         "n_positions", "original_max_position_embeddings")},
    **{k: _NUM for k in ("rope_theta", "rms_norm_eps", "layer_norm_eps",
                         "layer_norm_epsilon")}}


def load_config(root: Path) -> Optional[Dict[str, Any]]:
    """config.json of a model directory (or of a file's directory), or None."""
    for candidate in (root / "config.json", root.parent / "config.json"):
        if candidate.is_file():
            cfg = read_json(candidate, LLM_CONFIG_SCHEMA)
            if "text_config" in cfg and isinstance(cfg["text_config"], dict):
                cfg = check({**cfg, **cfg["text_config"]}, LLM_CONFIG_SCHEMA,
                            f"{candidate} (text_config)")
            return cfg
    return None


def hf_architecture(cfg: Dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if archs and isinstance(archs[0], str):
        return archs[0]
    return str(cfg.get("model_type") or "unknown")


def supported_architectures() -> List[str]:
    return sorted(FAMILIES)


def family_for(cfg: Dict[str, Any], config_path: str) -> Tuple[str, Family]:
    hf = hf_architecture(cfg)
    fam = FAMILIES.get(hf)
    if fam is None:
        raise ConfigurationError(
            f"{config_path}: architecture {hf!r} has no llama.cpp mapping in ArrowQuant (supported: "
            f"{', '.join(supported_architectures())}); use --gguf-arch generic (export_gguf(..., "
            "arch='generic')) for a raw GGUF with the source's tensor names, which llama.cpp "
            "cannot run")
    return hf, fam


def _find(cfg: Dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return None


def _rope_params(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Rope settings across transformers versions: 5.x keeps them in
    ``rope_parameters``, 4.x in ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and cfg.get("rope_theta") is not None:
        params["rope_theta"] = cfg["rope_theta"]
    if "original_max_position_embeddings" not in params and \
            cfg.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return params


def _head_dim(cfg: Dict[str, Any]) -> Optional[int]:
    hd = cfg.get("head_dim")
    if hd:
        return int(hd)
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    return int(hidden) // int(heads) if heads and hidden else None


def hyperparameters(cfg: Dict[str, Any], fam: Family, arch_name: str) -> Tuple[List[KeyValue],
                                                                              List[str]]:
    """``<arch>.*`` keys from config.json (keys from gguf.Keys)."""
    g = _gguf()
    K = g.Keys
    md: List[KeyValue] = []
    notes: List[str] = []

    def put(key_fmt: str, vtype: str, value: Any) -> None:
        if value is None:
            return
        value = float(value) if vtype == "float32" else (bool(value) if vtype == "bool"
                                                         else int(value))
        md.append((key_fmt.format(arch=arch_name), vtype, value))

    put(K.LLM.CONTEXT_LENGTH, "uint32", _find(cfg, "max_position_embeddings", "n_ctx",
                                              "n_positions"))
    put(K.LLM.EMBEDDING_LENGTH, "uint32", _find(cfg, "hidden_size", "n_embd", "dim"))
    put(K.LLM.BLOCK_COUNT, "uint32", _find(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    put(K.LLM.FEED_FORWARD_LENGTH, "uint32", _find(cfg, "intermediate_size", "n_inner"))
    put(K.Attention.HEAD_COUNT, "uint32", _find(cfg, "num_attention_heads", "n_head"))
    put(K.Attention.HEAD_COUNT_KV, "uint32", _find(cfg, "num_key_value_heads", "n_kv_heads"))
    if fam.encoder or cfg.get("is_causal") is False:
        put(K.Attention.CAUSAL, "bool", False)

    if not fam.encoder:
        rope = _rope_params(cfg)
        put(K.Rope.FREQ_BASE, "float32", rope.get("rope_theta"))
        rtype = str(rope.get("rope_type") or "default").lower()
        factor = rope.get("factor")
        if rtype == "linear" and factor is not None:
            md.append((K.Rope.SCALING_TYPE.format(arch=arch_name), "string",
                       g.RopeScalingType.LINEAR.value))
            put(K.Rope.SCALING_FACTOR, "float32", factor)
        elif rtype == "yarn" and factor is not None:
            md.append((K.Rope.SCALING_TYPE.format(arch=arch_name), "string",
                       g.RopeScalingType.YARN.value))
            put(K.Rope.SCALING_FACTOR, "float32", factor)
            put(K.Rope.SCALING_ORIG_CTX_LEN, "uint32", rope.get("original_max_position_embeddings"))
            put(K.Rope.SCALING_YARN_EXT_FACTOR, "float32", rope.get("extrapolation_factor"))
            put(K.Rope.SCALING_YARN_ATTN_FACTOR, "float32",
                _find(rope, "attention_factor", "attn_factor"))
            put(K.Rope.SCALING_YARN_BETA_FAST, "float32", rope.get("beta_fast"))
            put(K.Rope.SCALING_YARN_BETA_SLOW, "float32", rope.get("beta_slow"))
        elif rtype == "llama3":
            notes.append("rope scaling 'llama3': frequency factors written as rope_freqs.weight")
        elif rtype not in ("default", "none"):
            raise ConfigurationError(
                f"rope scaling type {rtype!r} has no llama.cpp equivalent in ArrowQuant's export; "
                "use --gguf-arch generic")
        put(K.Attention.LAYERNORM_RMS_EPS, "float32", _find(cfg, "rms_norm_eps"))
    put(K.Attention.LAYERNORM_EPS, "float32", _find(cfg, "layer_norm_eps", "layer_norm_epsilon"))
    if cfg.get("head_dim") is not None:
        put(K.Attention.KEY_LENGTH, "uint32", cfg["head_dim"])
        put(K.Attention.VALUE_LENGTH, "uint32", cfg["head_dim"])
    if fam.vocab_size_key:
        put(K.LLM.VOCAB_SIZE, "uint32", cfg.get("vocab_size"))
    if fam.rope_dim_key:
        put(K.Rope.DIMENSION_COUNT, "uint32", _head_dim(cfg))
    return md, notes


def pooling_type(root: Path) -> Optional[Tuple[int, str]]:
    """(gguf.PoolingType value, source) from a sentence-transformers
    modules.json + Pooling config, as llama.cpp's converter reads it."""
    g = _gguf()
    modules = root / "modules.json"
    if not modules.is_file():
        return None
    try:
        mods = json.loads(modules.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigurationError(f"{modules}: not valid JSON ({e})") from e
    path = next((m.get("path") for m in mods if str(m.get("type", "")).endswith("Pooling")), None)
    if path is None:
        return None
    cfg_path = root / path / "config.json"
    if not cfg_path.is_file():
        raise ConfigurationError(f"{cfg_path}: the Pooling module's config.json is missing")
    pool = json.loads(cfg_path.read_text(encoding="utf-8"))
    if pool.get("pooling_mode_mean_tokens") or pool.get("pooling_mode") == "mean":
        return int(g.PoolingType.MEAN), f"mean ({cfg_path.parent.name}/config.json)"
    if pool.get("pooling_mode_cls_token") or pool.get("pooling_mode") == "cls":
        return int(g.PoolingType.CLS), f"cls ({cfg_path.parent.name}/config.json)"
    if pool.get("pooling_mode_lasttoken") or pool.get("pooling_mode") == "lasttoken":
        return int(g.PoolingType.LAST), f"last token ({cfg_path.parent.name}/config.json)"
    raise ConfigurationError(f"{cfg_path}: pooling mode not supported by llama.cpp "
                             "(mean, cls or last token)")


def qk_row_order(rows: int, n_head: int) -> np.ndarray:
    """Source row of each written row for llama.cpp's rotary layout: within
    each of `n_head` heads, HF keeps the first halves of the rotary pairs in
    rows [0, d/2) and the second halves in [d/2, d); llama.cpp interleaves
    them (row 2i is pair i's first half, 2i+1 its second)."""
    if n_head <= 0 or rows % (2 * n_head):
        raise ConfigurationError(f"cannot split {rows} rows into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    return np.arange(rows, dtype=np.int64).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def _llama3_rope_factors(cfg: Dict[str, Any]) -> np.ndarray:
    """Per-frequency factors of rope type 'llama3' (Llama 3.1+): llama.cpp
    divides each rotary frequency by its factor (rope_freqs.weight)."""
    rope = _rope_params(cfg)
    base = float(rope.get("rope_theta", 10000.0))
    dim = _head_dim(cfg)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _f32_kinds() -> Dict[Any, str]:
    """Roles llama.cpp computes with as F32 whatever their shape (ggml_add /
    ggml_get_rows on small tables, routers, convolutions): the list its
    converter and llama_model_quantize keep unquantized."""
    g = _gguf()
    T = g.MODEL_TENSOR
    reasons = {
        "TOKEN_TYPES": "token-type embedding: llama.cpp adds its rows with ggml_add, which needs F32",
        "POS_EMBD": "position embedding: llama.cpp keeps it in F32 (added with ggml_add)",
        "FFN_GATE_INP": "MoE router: llama.cpp keeps it in F32",
        "FFN_GATE_INP_SHEXP": "MoE shared-expert router: llama.cpp keeps it in F32",
        "SSM_CONV1D": "SSM convolution: llama.cpp keeps it in F32",
    }
    return {getattr(T, k): v for k, v in reasons.items() if hasattr(T, k)}


def _block_of(name: str) -> Optional[int]:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


def _normalize_name(fam: Family, name: str) -> str:
    """Source-name spellings the name map does not know (read in the
    converter's filter_tensors)."""
    if fam.arch == "BERT":
        if name.startswith("bert."):
            name = name[5:]
        if name.endswith(".gamma"):
            name = name[:-6] + ".weight"
        elif name.endswith(".beta"):
            name = name[:-5] + ".bias"
    return name


def plan_tensors(tensors: Sequence[Any], cfg: Dict[str, Any], fam: Family, hf_arch: str,
                 config_path: str) -> List[GgufTensor]:
    """Per source tensor: llama.cpp name, written shape, permutation, F32
    reason, or skip reason. `tensors` are TensorInfo (name, shape, dtype)."""
    g = _gguf()
    arch = getattr(g.MODEL_ARCH, fam.arch)
    n_blocks = int(_find(cfg, "num_hidden_layers", "n_layer", "num_layers") or 0)
    name_map = g.get_tensor_name_map(arch, n_blocks)
    allowed = set(g.MODEL_TENSORS[arch])
    f32_kinds = _f32_kinds()
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_head

    out: List[GgufTensor] = []
    seen: Dict[str, str] = {}
    for t in tensors:
        shape = tuple(int(d) for d in t.shape)
        entry = GgufTensor(source=t.name, name=None, shape=shape, dtype=t.dtype,
                           block=_block_of(t.name))
        name = _normalize_name(fam, t.name)
        skip = next((why for pre, why in fam.skip_prefixes if name.startswith(pre)), None)
        skip = skip or next((why for suf, why in _ROTARY_SKIP if name.endswith(suf)), None)
        if skip is None and name.endswith((".attention.masked_bias", ".attention.bias")):
            skip = "causal-mask buffer: llama.cpp builds its own mask"
        if skip is None and t.dtype not in QUANTIZABLE_DTYPES:
            skip = f"dtype {t.dtype} is not floating point (a buffer, not a weight)"
        if skip is None and math.prod(shape) == 0:
            skip = "empty tensor"
        if skip is not None:
            entry.skip_reason = skip
            out.append(entry)
            continue
        mapped = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None or mapped[0] not in allowed:
            raise ConfigurationError(
                f"{config_path}: tensor {t.name!r} of architecture {hf_arch!r} has no llama.cpp "
                f"name for {g.MODEL_ARCH_NAMES[arch]!r} in the gguf package's name map; use --gguf-arch generic to write the source's names")
        kind, gname = mapped
        if gname in seen:
            raise ConfigurationError(f"{config_path}: tensors {seen[gname]!r} and {t.name!r} both "
                                     f"map to llama.cpp's {gname!r}")
        seen[gname] = t.name
        entry.name, entry.kind = gname, kind
        if fam.permute_qk and kind in (g.MODEL_TENSOR.ATTN_Q, g.MODEL_TENSOR.ATTN_K):
            heads = n_head if kind == g.MODEL_TENSOR.ATTN_Q else n_kv
            if not heads:
                raise ConfigurationError(f"{config_path}: num_attention_heads is needed to "
                                         f"permute {t.name!r} for llama.cpp's rotary layout")
            entry.row_order = qk_row_order(shape[0], int(heads))
            entry.transform = (f"rows permuted to llama.cpp's rotary layout ({heads} heads of "
                               f"{shape[0] // int(heads)} rows: halves interleaved)")
        if len(shape) <= 1:
            entry.f32_reason = f"{len(shape)}-D (norm / bias): llama.cpp computes with it in F32"
        elif gname.endswith("_norm.weight"):
            entry.f32_reason = "norm weight: llama.cpp computes norms in F32"
        elif kind in f32_kinds:
            entry.f32_reason = f32_kinds[kind]
        elif not gname.endswith(".weight"):
            entry.f32_reason = "not a .weight (bias): llama.cpp keeps it in F32"
        out.append(entry)

    if not fam.encoder and str(_rope_params(cfg).get("rope_type", "")).lower() == "llama3":
        kind = g.MODEL_TENSOR.ROPE_FREQS
        data = _llama3_rope_factors(cfg)
        out.append(GgufTensor(source=None, name=g.TENSOR_NAMES[kind] + ".weight",
                              shape=tuple(data.shape), dtype="float32", kind=kind, data=data,
                              f32_reason="rope frequency factors (generated from rope "
                                         "scaling 'llama3'): F32",
                              transform="generated from config.json rope_scaling"))
    return out


def plan_architecture(root: Path, tensors: Sequence[Any], name: Optional[str] = None,
                      cfg: Optional[Dict[str, Any]] = None) -> ArchPlan:
    """The llama.cpp plan of the model at `root` (a directory with
    config.json). ConfigurationError when it cannot be mapped."""
    g = _gguf()
    config_path = str(root / "config.json")
    if cfg is None:
        cfg = load_config(root)
    if cfg is None:
        raise ConfigurationError(f"{root}: no config.json, so no architecture to map to llama.cpp; "
                                 "use --gguf-arch generic")
    hf_arch, fam = family_for(cfg, config_path)
    arch = getattr(g.MODEL_ARCH, fam.arch)
    arch_name = g.MODEL_ARCH_NAMES[arch]
    K = g.Keys
    model_name = name or cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or \
        root.name or "model"
    md: List[KeyValue] = [
        (K.General.ARCHITECTURE, "string", arch_name),
        (K.General.TYPE, "string", "model"),
        (K.General.NAME, "string", str(model_name)),
    ]
    hp, notes = hyperparameters(cfg, fam, arch_name)
    md += hp
    if fam.encoder:
        pool = pooling_type(root)
        if pool is not None:
            md.append((K.LLM.POOLING_TYPE.format(arch=arch_name), "uint32", pool[0]))
            notes.append(f"pooling: {pool[1]}")
        else:
            notes.append("pooling: none given (no sentence-transformers modules.json); "
                         "llama.cpp then returns per-token embeddings unless told a pooling")
    planned = plan_tensors(tensors, cfg, fam, hf_arch, config_path)
    return ArchPlan(arch=arch_name, hf_arch=hf_arch, metadata=md, tensors=planned, notes=notes)
