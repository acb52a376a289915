"""The plan of a llama.cpp GGUF file: architecture + tokenizer + per-tensor
types, everything but the bytes. gguf_export's streaming writer executes it.

``arch`` modes: ``"auto"`` maps a Hugging Face model directory to its
llama.cpp architecture (ConfigurationError naming the architecture when it
cannot); a source with no config.json at all (a bare SafeTensors file, a
Parquet V1 model) has no architecture to map and is written raw, with a
warning. ``"generic"`` always writes the raw export (source names,
architecture ``arrowquant``), which llama.cpp cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from ...errors import ConfigurationError
from .arch import ArchPlan, GgufTensor, KeyValue, load_config, plan_architecture
from .tokenizer import TokenizerPlan, plan_tokenizer
from .types import TypeChoice, TypeRule, UniformType, choose

ARCH_MODES = ("auto", "generic")


@dataclass
class PlannedTensor:
    """One tensor the writer streams: the GgufTensor plus its type choice."""

    tensor: GgufTensor
    choice: TypeChoice


@dataclass
class FilePlan:
    arch: ArchPlan
    tokenizer: TokenizerPlan
    metadata: List[KeyValue]
    tensors: List[PlannedTensor]
    skipped: List[GgufTensor]
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def model_dir(src: Any) -> Path:
    root = Path(src.root)
    return root if root.is_dir() else root.parent


def plan_file(src: Any, arch: str, target: str, type_rule: Optional[TypeRule] = None,
              name: Optional[str] = None) -> Optional[FilePlan]:
    """The llama.cpp plan for `src` (an open ModelSource), or None for the
    raw export (``arch="generic"``, or no config.json under ``"auto"``)."""
    if arch not in ARCH_MODES:
        raise ConfigurationError(f"GGUF architecture mode must be one of {', '.join(ARCH_MODES)}, "
                                 f"got {arch!r}")
    if arch == "generic":
        return None
    root = model_dir(src)
    cfg = load_config(root)
    if cfg is None:
        return None
    ap = plan_architecture(root, src.tensors, name=name, cfg=cfg)
    tok = plan_tokenizer(root, cfg)
    rule = type_rule or UniformType(target)
    planned: List[PlannedTensor] = []
    skipped: List[GgufTensor] = []
    for t in ap.tensors:
        if t.name is None:
            skipped.append(t)
            continue
        planned.append(PlannedTensor(t, choose(rule, t)))
    _check_vocab(planned, tok, root)
    return FilePlan(arch=ap, tokenizer=tok, metadata=ap.metadata + tok.metadata,
                    tensors=planned, skipped=skipped, notes=ap.notes + tok.notes,
                    warnings=list(tok.warnings))


def _check_vocab(planned: Sequence[PlannedTensor], tok: TokenizerPlan, root: Path) -> None:
    """llama.cpp sizes token_embd / output by the token count: catch a
    mismatch here rather than as a load failure."""
    for p in planned:
        if p.tensor.name in ("token_embd.weight", "output.weight") and \
                int(p.tensor.shape[0]) != tok.n_tokens:
            raise ConfigurationError(
                f"{root}: {p.tensor.source} has {p.tensor.shape[0]} rows but the tokenizer has "
                f"{tok.n_tokens} tokens; llama.cpp needs them equal")
