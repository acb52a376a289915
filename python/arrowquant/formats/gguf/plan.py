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
from typing import Any, List, Optional, Sequence, Tuple

from ...errors import ConfigurationError
from .arch import ArchPlan, GgufTensor, KeyValue, load_config, plan_architecture
from .tokenizer import TokenizerPlan, plan_tokenizer
from .types import TypeChoice, TypeRule, UniformType, choose, llama_preset_rule

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
    file_type: Optional[str] = None     # llama.cpp file type name (a preset's)
    allocation: Optional[dict] = None   # --target-bpw summary


@dataclass
class TypeOptions:
    """How the per-tensor types are chosen (beside the target type): a
    llama.cpp preset name, --keep / --bits-for patterns, a --target-bpw
    budget, per-tensor importance (calibration), threads for measuring."""

    preset: Optional[str] = None
    keep: Sequence[str] = ()
    bits_for: Any = None
    target_bpw: Optional[float] = None
    importance: Any = None  # callable(GgufTensor) -> per-column weights or None
    threads: int = 0


def model_dir(src: Any) -> Path:
    root = Path(src.root)
    return root if root.is_dir() else root.parent


def plan_file(src: Any, arch: str, target: str, type_rule: Optional[TypeRule] = None,
              name: Optional[str] = None,
              options: Optional[TypeOptions] = None) -> Optional[FilePlan]:
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
    kept = [t for t in ap.tensors if t.name is not None]
    rule, file_type, allocation = _rule(src, target, type_rule, options or TypeOptions(), cfg,
                                        kept)
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
                    warnings=list(tok.warnings), file_type=file_type, allocation=allocation)


def _rule(src: Any, target: str, type_rule: Optional[TypeRule], o: TypeOptions, cfg: dict,
          tensors: Sequence[GgufTensor]) -> Tuple[TypeRule, Optional[str], Optional[dict]]:
    """The rule of every tensor: a given one, a preset, or the uniform type;
    --keep / --bits-for in front; --target-bpw choosing the free tensors."""
    from .allocate import FixedChoices, OverrideRule, allocate_bpw, check_bits_for

    file_type = None
    if type_rule is not None:
        base = type_rule
    elif o.preset is not None:
        base = llama_preset_rule(o.preset, cfg, tensors, imatrix=o.importance is not None)
        file_type = o.preset
    else:
        base = UniformType(target)
    over = OverrideRule(base, tuple(o.keep or ()), check_bits_for(dict(o.bits_for or {})))
    if o.target_bpw is None:
        return over, file_type, None

    def fixed(t: GgufTensor) -> Optional[TypeChoice]:
        if t.f32_reason:
            return TypeChoice("F32", t.f32_reason, False)
        return over.pinned(t)

    choices, summary = allocate_bpw(src, tensors, float(o.target_bpw), fixed,
                                    importance=o.importance, threads=o.threads)
    return FixedChoices(choices, over), None, summary


def _check_vocab(planned: Sequence[PlannedTensor], tok: TokenizerPlan, root: Path) -> None:
    """llama.cpp sizes token_embd / output by the token count: catch a
    mismatch here rather than as a load failure."""
    for p in planned:
        if p.tensor.name in ("token_embd.weight", "output.weight") and \
                int(p.tensor.shape[0]) != tok.n_tokens:
            raise ConfigurationError(
                f"{root}: {p.tensor.source} has {p.tensor.shape[0]} rows but the tokenizer has "
                f"{tok.n_tokens} tokens; llama.cpp needs them equal")
