"""Which kind of model this is (text, code, image, audio), which rule decided,
and on what evidence.

Rules, first one that decides wins:

1. "config": the run's configuration names a modality.
2. "metadata.json": a `metadata.json` beside the weights has "modality"
   (Parquet V1 and ArrowQuant V2 models).
3. "safetensors-metadata": the `metadata` argument (what the source read
   from SafeTensors `__metadata__`), or else the `__metadata__` of the
   SafeTensors files and the "metadata" of `*.safetensors.index.json`, has a
   "modality" key.
4. "config.json": the model's config.json. diffusers (`_class_name`) ->
   image, or audio for the audio models; transformers `architectures` /
   `model_type` -> text, code (a code model: codegen, starcoder,
   gpt_bigcode, ... or a `_name_or_path` naming one), audio (whisper,
   wav2vec2, ...) or image (vit, convnext, ...).
   "model_index.json": a diffusers pipeline's `_class_name` (in the model's
   directory or its parent, for a component such as unet/).
5. "tensor-names": counts of tensor names matching each modality's
   patterns; the largest count decides (ties: unknown). Code cannot be told
   from tensor names.
6. "none": nothing decided; modality "unknown".
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import MODALITIES

UNKNOWN = "unknown"

# --------------------------------------------------------------------- config.json rules

#: diffusers model / pipeline class names (lowercase substrings) that mean audio.
_DIFFUSERS_AUDIO = ("unet1d", "audioldm", "musicldm", "dancediffusion", "spectrogram",
                    "melgan", "stableaudio", "t5filmdecoder", "vocoder", "audio")
#: transformers model_type / architecture substrings, lowercase.
_TF_CODE = ("codegen", "starcoder", "gpt_bigcode", "gptbigcode", "codet5", "codellama",
            "codeqwen", "codegemma", "codesage", "santacoder")
_TF_AUDIO = ("whisper", "wav2vec", "hubert", "wavlm", "speecht5", "encodec", "musicgen",
             "bark", "seamless", "clap", "unispeech", "data2vec-audio", "data2vecaudio",
             "audio", "speech", "sew", "mctct", "univnet", "vits", "pop2piano", "mimi",
             "dac", "mel")
_TF_IMAGE = ("vit", "deit", "beit", "swin", "convnext", "resnet", "regnet", "efficientnet",
             "mobilenet", "dinov2", "segformer", "detr", "yolos", "sam", "mask2former",
             "dpt", "levit", "poolformer", "vision", "image", "dinat", "nat", "bit",
             "conditional_detr", "upernet", "mobilevit", "focalnet", "hiera")
_TF_TEXT = ("llama", "mistral", "mixtral", "gpt2", "gpt_neo", "gptj", "gpt_neox", "bert",
            "roberta", "deberta", "distilbert", "albert", "electra", "mpnet", "xlm", "t5",
            "mt5", "bart", "mbart", "pegasus", "marian", "opt", "bloom", "falcon", "qwen",
            "phi", "gemma", "olmo", "stablelm", "mamba", "rwkv", "cohere", "internlm",
            "baichuan", "chatglm", "deepseek", "jamba", "granite", "nemotron", "ernie",
            "camembert", "flaubert", "longformer", "bigbird", "funnel", "reformer", "xlnet")
#: a `_name_or_path` naming a code model: "codellama/...", "deepseek-coder-...", "codebert".
_CODE_NAME = re.compile(r"(?:^|[/_.\-])(?:code|coder)")
#: architecture suffixes that are text tasks when model_type says nothing else.
_TF_TEXT_HEADS = ("forcausallm", "formaskedlm", "forseq2seqlm", "forsequenceclassification",
                  "fortokenclassification", "forquestionanswering", "lmheadmodel")

# --------------------------------------------------------------------- tensor-name rules

def _rx(*words: str) -> "re.Pattern[str]":
    # A word matches as a whole dotted/underscored component prefix, e.g.
    # "mel" matches "mel_filters" and "encoder.mel.0" but not "model".
    return re.compile(r"(?:^|[._])(?:" + "|".join(words) + r")", re.IGNORECASE)


TENSOR_PATTERNS: Dict[str, "re.Pattern[str]"] = {
    "text": _rx(r"embed_tokens", r"lm_head", r"self_attn\.", r"mlp\.(?:gate|up|down)_proj",
                r"input_layernorm", r"post_attention_layernorm", r"word_embeddings",
                r"token_type_embeddings", r"attention\.self\.(?:query|key|value)", r"wte\.",
                r"wpe\.", r"c_attn\.", r"c_fc\.", r"final_layernorm", r"ln_f\."),
    "image": _rx(r"conv_in\.", r"conv_out\.", r"conv_norm_out", r"down_blocks\.",
                 r"up_blocks\.", r"mid_block\.", r"time_embedding", r"time_emb_proj",
                 r"patch_embed", r"pos_embed\.", r"x_embedder", r"t_embedder",
                 r"timestep_embedder", r"adaln", r"transformer_blocks\.\d+\.attn[12]\.",
                 r"downsamplers\.", r"upsamplers\.", r"encoder\.down\.", r"decoder\.up\.",
                 r"quant_conv"),
    "audio": _rx(r"mel", r"spectrogram", r"vocoder", r"feature_extractor\.conv_layers",
                 r"feature_projection", r"conv_pre\.", r"conv_post\.", r"ups\.\d",
                 r"audio_", r"wav_"),
}


@dataclass(frozen=True)
class ModalityDecision:
    """modality: text, code, image, audio or unknown; rule: which rule decided
    ("config", "metadata.json", "safetensors-metadata", "config.json",
    "model_index.json", "tensor-names", "none"); evidence: what it saw."""

    modality: str
    rule: str
    evidence: str
    counts: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"modality": self.modality, "rule": self.rule,
                             "evidence": self.evidence}
        if self.counts:
            d["counts"] = dict(self.counts)
        return d


def detect_modality(root_path: Union[str, Path, None], tensor_names: Iterable[str],
                    metadata: Optional[Mapping[str, Any]] = None,
                    config: Any = None) -> ModalityDecision:
    """Decides the modality by the rules of the module docstring.

    root_path: the model's directory or one of its files (None: no files).
    tensor_names: the names of the model's tensors.
    metadata: SafeTensors `__metadata__` (or index metadata) already read by
    the source; when None, the SafeTensors headers and index under root_path
    are read (headers only).
    config: a DiffusionQuantConfig (its .modality), a modality string, or None."""
    names = list(tensor_names)
    root = _model_dir(root_path)

    wanted = config if isinstance(config, str) or config is None else getattr(config, "modality", None)
    if wanted is not None:
        return ModalityDecision(_checked(wanted, "config"), "config",
                                f"the configuration sets modality={wanted!r}")

    if root is not None:
        meta_path = root / "metadata.json"
        meta = _read_json(meta_path)
        if isinstance(meta, dict) and meta.get("modality") not in (None, ""):
            value = meta["modality"]
            return ModalityDecision(_checked(value, str(meta_path)), "metadata.json",
                                    f"{meta_path.name}: modality={value!r}")

    for where, md in _safetensors_metadata(root, metadata):
        value = md.get("modality") if isinstance(md, Mapping) else None
        if value not in (None, ""):
            return ModalityDecision(_checked(value, where), "safetensors-metadata",
                                    f"{where}: modality={value!r}")

    if root is not None:
        decision = _from_model_config(root)
        if decision is not None:
            return decision

    return _from_tensor_names(names)


# --------------------------------------------------------------------- helpers


def _model_dir(root_path: Union[str, Path, None]) -> Optional[Path]:
    if root_path is None:
        return None
    p = Path(root_path)
    if p.is_dir():
        return p
    if p.exists():
        return p.parent
    return None


def _checked(value: Any, where: str) -> str:
    from ..errors import MetadataError

    if not isinstance(value, str) or value.lower() not in MODALITIES:
        raise MetadataError(
            f"{where}: modality {value!r} is not one of {', '.join(MODALITIES)}")
    return value.lower()


def _read_json(path: Path) -> Any:
    """The JSON file at `path` (None when absent), checked against the schema
    of its name (jsonfile): a wrong type is a MetadataError naming file and key."""
    from ..jsonfile import (CONFIG_SCHEMA, INDEX_SCHEMA, MODEL_INDEX_SCHEMA,
                            MODEL_METADATA_SCHEMA, read_json)

    if not path.is_file():
        return None
    schema = {"config.json": CONFIG_SCHEMA, "metadata.json": MODEL_METADATA_SCHEMA,
              "model_index.json": MODEL_INDEX_SCHEMA}.get(path.name, dict)
    if path.name.endswith(".index.json"):
        schema = INDEX_SCHEMA
    return read_json(path, schema)


def _safetensors_header_metadata(path: Path) -> Optional[Dict[str, Any]]:
    """`__metadata__` of a SafeTensors file, reading only its header."""
    from ..errors import MetadataError

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MetadataError(f"{path}: too short for a SafeTensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 1024 * 1024:
                raise MetadataError(f"{path}: SafeTensors header of {n} bytes is implausible")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot read SafeTensors header: {exc}") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    return md if isinstance(md, dict) else None


def _safetensors_metadata(root: Optional[Path], given: Optional[Mapping[str, Any]]
                          ) -> List[Tuple[str, Mapping[str, Any]]]:
    if given is not None:
        return [("SafeTensors metadata", given)]
    if root is None:
        return []
    found: List[Tuple[str, Mapping[str, Any]]] = []
    for index in sorted(root.glob("*.safetensors.index.json")):
        data = _read_json(index)
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            found.append((f"{index.name} metadata", data["metadata"]))
    for path in sorted(root.glob("*.safetensors")):
        md = _safetensors_header_metadata(path)
        if md:
            found.append((f"{path.name} __metadata__", md))
    return found


def _contains(text: str, words: Sequence[str]) -> Optional[str]:
    for w in words:
        if w in text:
            return w
    return None


def _diffusers_class(name: str) -> str:
    low = name.lower()
    return "audio" if _contains(low, _DIFFUSERS_AUDIO) else "image"


def _transformers_modality(cfg: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(modality, evidence) from a transformers config.json, or None."""
    model_type = str(cfg.get("model_type") or "").lower()
    archs = [str(a) for a in (cfg.get("architectures") or []) if isinstance(a, str)]
    name_or_path = str(cfg.get("_name_or_path") or "").lower()
    fields = []
    if archs:
        fields.append(f"architectures={archs}")
    if model_type:
        fields.append(f"model_type={model_type!r}")
    evidence = ", ".join(fields)
    arch_low = " ".join(a.lower() for a in archs)
    both = f"{model_type} {arch_low}"

    hit = _contains(both, _TF_CODE)
    if hit:
        return "code", f"config.json: {evidence} (a code model: {hit!r})"
    m = _CODE_NAME.search(name_or_path)
    if m:
        return "code", (f"config.json: {evidence}; _name_or_path={cfg.get('_name_or_path')!r} "
                        f"names a code model")
    for modality, words in (("audio", _TF_AUDIO), ("image", _TF_IMAGE), ("text", _TF_TEXT)):
        if model_type and _token_hit(model_type, words):
            return modality, f"config.json: {evidence} ({modality} model type)"
    for modality, words in (("audio", _TF_AUDIO), ("image", _TF_IMAGE), ("text", _TF_TEXT)):
        for a in archs:
            if _arch_hit(a, words):
                return modality, f"config.json: {evidence} ({modality} architecture {a})"
    if any(a.lower().endswith(_TF_TEXT_HEADS) for a in archs):
        return "text", f"config.json: {evidence} (a text task head)"
    return None


def _token_hit(model_type: str, words: Sequence[str]) -> bool:
    # model_type is a short identifier: match it whole, a word followed by a
    # version ("qwen2", "phi3"), or one of its tokens ("clip_vision_model"),
    # never a random substring ("bit" in "orbit").
    if model_type in words:
        return True
    for w in words:
        if model_type.startswith(w) and not model_type[len(w)].isalpha():
            return True
    return any(t in words for t in re.split(r"[-_ ]", model_type))


def _arch_hit(arch: str, words: Sequence[str]) -> bool:
    # Architecture names are CamelCase: compare the leading word(s).
    low = arch.lower()
    return any(low.startswith(w.replace("_", "")) for w in words if len(w) >= 3)


def _from_model_config(root: Path) -> Optional[ModalityDecision]:
    cfg = _read_json(root / "config.json")
    pipeline = _pipeline_decision(root)
    if isinstance(cfg, dict):
        cls = cfg.get("_class_name")
        if isinstance(cls, str) and cls:
            # A component of a pipeline (unet/ of AudioLDM) takes the pipeline's
            # modality: the same UNet class serves images and spectrograms.
            if pipeline is not None:
                return pipeline
            modality = _diffusers_class(cls)
            return ModalityDecision(modality, "config.json",
                                    f"config.json: diffusers _class_name={cls!r}")
        found = _transformers_modality(cfg)
        if found is not None:
            return ModalityDecision(found[0], "config.json", found[1])
    return pipeline


def _pipeline_decision(root: Path) -> Optional[ModalityDecision]:
    for where in (root, root.parent):
        index = _read_json(where / "model_index.json")
        if isinstance(index, dict) and isinstance(index.get("_class_name"), str):
            cls = index["_class_name"]
            rel = "model_index.json" if where == root else "../model_index.json"
            return ModalityDecision(_diffusers_class(cls), "model_index.json",
                                    f"{rel}: diffusers pipeline _class_name={cls!r}")
    return None


def _from_tensor_names(names: Sequence[str]) -> ModalityDecision:
    counts: Dict[str, int] = {}
    examples: Dict[str, List[str]] = {}
    for modality, rx in TENSOR_PATTERNS.items():
        hits = [n for n in names if rx.search(n)]
        counts[modality] = len(hits)
        examples[modality] = hits[:3]
    best = max(counts.values()) if counts else 0
    leaders = [m for m, c in counts.items() if c == best]
    summary = ", ".join(f"{m} {c}" for m, c in counts.items())
    if best == 0:
        return ModalityDecision(UNKNOWN, "none",
                                f"no rule decided; {len(names)} tensor names matched no "
                                f"pattern ({summary})", counts)
    if len(leaders) > 1:
        return ModalityDecision(UNKNOWN, "none",
                                f"tensor names tie between {' and '.join(leaders)} "
                                f"({summary} of {len(names)})", counts)
    m = leaders[0]
    return ModalityDecision(
        m, "tensor-names",
        f"{counts[m]} of {len(names)} tensor names look {m} ({summary}); "
        f"e.g. {', '.join(examples[m])}", counts)


__all__ = ["ModalityDecision", "detect_modality", "TENSOR_PATTERNS", "UNKNOWN"]
