"""tokenizer.ggml.* metadata for llama.cpp from a Hugging Face model directory.

Three vocab kinds, as llama.cpp's converter writes them:

* byte-level BPE (tokenizer.json, model BPE without byte fallback) ->
  ``tokenizer.ggml.model = "gpt2"``: tokens in byte-level spelling, merges,
  token types, and ``tokenizer.ggml.pre`` naming the pre-tokenizer regexes;
* SentencePiece-style BPE (tokenizer.json, BPE with ``byte_fallback``, the
  Llama-2 / Mistral kind) -> ``"llama"``: tokens with scores and types.
  llama.cpp's SPM tokenizer merges the adjacent pair whose joined text has
  the highest score, so a token's score is minus the rank of the merge that
  makes it: the pair BPE would merge first scores highest;
* WordPiece (tokenizer.json model WordPiece, or vocab.txt) -> ``"bert"``,
  in llama.cpp's phantom-space spelling (``##x`` -> ``x``, ``x`` -> ``▁x``).

Special token ids, add_bos / add_eos / add_sep and the chat template come from
``gguf.SpecialVocab`` (the PyPI gguf package reads tokenizer.json,
tokenizer_config.json, chat_template.jinja and config.json as the converter
does).

The BPE pre-tokenizer. llama.cpp does not read regexes from the file: it
knows a fixed set of pre-tokenizers by name, each with its regexes compiled
in (llama-vocab.cpp). Its converter finds the name by tokenizing a fixed test
text with the HF tokenizer and looking the hash of the token ids up in a
table of known models; an unknown hash stops the conversion. At load time,
llama.cpp refuses an unknown name and, when the key is missing, warns and
uses its 'default' regexes. ArrowQuant reads the pre-tokenizer itself from
tokenizer.json (its Split regexes, Digits and ByteLevel steps) and names
the llama.cpp pre-tokenizer whose regexes are the same (:data:`PRE_TOKENIZERS`;
the regexes are the ones llama-vocab.cpp lists as taken from each model's
tokenizer.json). That needs no model table and no transformers, and works for
every model with one of those pre-tokenizers whatever it is called. A
pre-tokenizer that matches none is written as 'default' (what llama.cpp
does without the key), and the report warns that llama.cpp may then split
digits and punctuation differently from Hugging Face.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...jsonfile import MapOf, Opt, read_json
from ...errors import ConfigurationError
from .arch import KeyValue, _gguf

#: The GPT-2 regex that a ByteLevel pre-tokenizer with use_regex applies.
_BYTELEVEL = "bytelevel"
_DIGITS_EACH = "digits:individual"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: Hugging Face pre-tokenizer steps -> llama.cpp pre-tokenizer name whose
#: compiled-in regexes split the same way (llama-vocab.cpp).
PRE_TOKENIZERS: Dict[Tuple[str, ...], str] = {
    (_BYTELEVEL,): "gpt-2",
    (_DIGITS_EACH, _BYTELEVEL): "smollm",  # digits one by one, then GPT-2 (StarCoder / SmolLM)
    (_LLAMA3_RE,): "llama-bpe",
    (_QWEN2_RE,): "qwen2",
}


@dataclass
class TokenizerPlan:
    model: str                          # tokenizer.ggml.model
    pre: Optional[str]
    metadata: List[KeyValue]
    n_tokens: int
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


_NODE = Opt(dict)
# What the export reads of tokenizer.json (jsonfile: a wrong type is a
# MetadataError naming the file and the key).
TOKENIZER_SCHEMA = {
    "model": {"type": Opt(str), "vocab": Opt((MapOf(int), list)), "merges": Opt(list),
              "byte_fallback": Opt(bool), "unk_token": Opt(str)},
    "added_tokens": Opt([{"id": int, "content": str, "special": Opt(bool)}]),
    "pre_tokenizer": _NODE, "normalizer": _NODE, "post_processor": _NODE}


def _read_json(path: Path) -> Dict[str, Any]:
    """A tokenizer file, checked (tokenizer.json against TOKENIZER_SCHEMA;
    the other files must hold an object)."""
    return read_json(path, TOKENIZER_SCHEMA if path.name == "tokenizer.json" else dict)


def pre_tokenizer_steps(tj: Dict[str, Any]) -> Tuple[Optional[Tuple[str, ...]], str]:
    """The pre-tokenizer of a tokenizer.json as a tuple of steps (regexes,
    ``bytelevel``, ``digits:individual``), or None when a step has no
    llama.cpp counterpart; and a readable description."""
    pt = tj.get("pre_tokenizer")
    if not pt:
        return (), "none"
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    steps: List[str] = []
    desc: List[str] = []
    ok = True
    for p in items:
        kind = p.get("type")
        if kind == "ByteLevel":
            desc.append(f"ByteLevel(use_regex={p.get('use_regex', True)})")
            if p.get("use_regex", True):
                steps.append(_BYTELEVEL)
            if p.get("add_prefix_space"):
                ok = False
        elif kind == "Split":
            pat = p.get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            desc.append(f"Split({regex or pat!r}, {p.get('behavior')})")
            if regex is None or p.get("behavior") != "Isolated" or p.get("invert"):
                ok = False
            else:
                steps.append(regex)
        elif kind == "Digits":
            desc.append(f"Digits(individual_digits={p.get('individual_digits', False)})")
            steps.append(_DIGITS_EACH if p.get("individual_digits") else "digits")
        else:
            desc.append(str(kind))
            ok = False
    return (tuple(steps) if ok else None), " + ".join(desc)


def bpe_pre_tokenizer(tj: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """(tokenizer.ggml.pre, warning or None) for a byte-level BPE tokenizer.json."""
    steps, desc = pre_tokenizer_steps(tj)
    if steps is not None and steps in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[steps], None
    return "default", (f"BPE pre-tokenizer {desc} matches none of the llama.cpp pre-tokenizers "
                       f"ArrowQuant knows ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}): "
                       "written as 'default', llama.cpp may split digits and punctuation "
                       "differently from Hugging Face")


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _merge_pairs(merges: Sequence[Any]) -> List[Tuple[str, str]]:
    out = []
    for m in merges:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
        else:
            a, b = m[0], m[1]
        out.append((a, b))
    return out


def _base_lists(n: int) -> Tuple[List[str], List[int]]:
    g = _gguf()
    return [f"[PAD{i}]" for i in range(n)], [int(g.TokenType.UNUSED)] * n


def _size(vocab_ids: Sequence[int], vocab_size: Optional[int], where: Path) -> int:
    top = max(vocab_ids) + 1 if vocab_ids else 0
    if vocab_size is None:
        return top
    if top > vocab_size:
        raise ConfigurationError(f"{where}: the tokenizer has ids up to {top - 1}, beyond the "
                                 f"model's vocab_size {vocab_size} (config.json)")
    return int(vocab_size)


def _special_vocab(root: Path, n: int, merges: bool):
    g = _gguf()
    return g.SpecialVocab(root, load_merges=merges, n_vocab=n)


def _post_processor_adds(tj: Dict[str, Any]) -> Tuple[bool, bool]:
    """(adds a leading special token, adds a trailing one) for one sequence:
    a fast tokenizer adds special tokens only through its post-processor."""
    pp = tj.get("post_processor") or {}
    lead = trail = False
    for proc in pp.get("processors", [pp]) if pp else []:
        kind = proc.get("type")
        if kind in ("BertProcessing", "RobertaProcessing"):
            lead = trail = True
        elif kind == "TemplateProcessing":
            single = proc.get("single", [])
            lead = lead or bool(single and "SpecialToken" in single[0])
            trail = trail or bool(len(single) > 1 and "SpecialToken" in single[-1])
    return lead, trail


def _explicit_add_flags(sv: Any, tj: Dict[str, Any]) -> None:
    """Writes add_bos / add_eos even when gguf's SpecialVocab found no
    template to read them from: llama.cpp's defaults differ by vocab kind
    (SentencePiece adds a BOS unless told not to), Hugging Face adds only
    what the post-processor says."""
    lead, trail = _post_processor_adds(tj)
    sv.add_special_token.setdefault("bos", lead)
    sv.add_special_token.setdefault("eos", trail)


def _special_metadata(sv: Any) -> List[KeyValue]:
    g = _gguf()
    T = g.Keys.Tokenizer
    md: List[KeyValue] = []
    # Only the kinds gguf has a key for (e.g. no cls: llama.cpp uses bos).
    for typ, tid in sv.special_token_ids.items():
        key = getattr(T, f"{typ.upper()}_ID", None)
        if key is not None:
            md.append((key, "uint32", int(tid)))
    for typ, value in sv.add_special_token.items():
        key = getattr(T, f"ADD_{typ.upper()}", None)
        if key is not None:
            md.append((key, "bool", bool(value)))
    tmpl = sv.chat_template
    if isinstance(tmpl, str):
        md.append((T.CHAT_TEMPLATE, "string", tmpl))
    elif isinstance(tmpl, list):
        for t in tmpl:
            name, text = t.get("name"), t.get("template")
            if name == "default":
                md.append((T.CHAT_TEMPLATE, "string", text))
            elif name and text:
                md.append((T.CHAT_TEMPLATE_N.format(name=name), "string", text))
    return md


def _added(tj: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [a for a in tj.get("added_tokens", []) if isinstance(a.get("id"), int)]


def _gpt2(root: Path, tj: Dict[str, Any], vocab_size: Optional[int]) -> TokenizerPlan:
    g = _gguf()
    T = g.Keys.Tokenizer
    TT = g.TokenType
    vocab: Dict[str, int] = tj["model"]["vocab"]
    added = _added(tj)
    n = _size(list(vocab.values()) + [a["id"] for a in added], vocab_size, root / "tokenizer.json")
    tokens, types = _base_lists(n)
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TT.NORMAL)
    for a in added:
        special = a.get("special") or _looks_special(a["content"])
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(TT.CONTROL if special else TT.USER_DEFINED)
    sv = _special_vocab(root, n, merges=True)
    _explicit_add_flags(sv, tj)
    if not sv.merges:
        raise ConfigurationError(f"{root / 'tokenizer.json'}: a BPE tokenizer without merges")
    pre, warning = bpe_pre_tokenizer(tj)
    md: List[KeyValue] = [
        (T.MODEL, "string", "gpt2"), (T.PRE, "string", pre),
        (T.LIST, "array[string]", tokens), (T.TOKEN_TYPE, "array[int32]", types),
        (T.MERGES, "array[string]", list(sv.merges)),
    ] + _special_metadata(sv)
    plan = TokenizerPlan("gpt2", pre, md, n, notes=[
        f"byte-level BPE: {len(vocab)} tokens + {len(added)} added, {len(sv.merges)} merges, "
        f"pre-tokenizer {pre!r} ({pre_tokenizer_steps(tj)[1]})"])
    if warning:
        plan.warnings.append(warning)
    return plan


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _spm(root: Path, tj: Dict[str, Any], vocab_size: Optional[int]) -> TokenizerPlan:
    g = _gguf()
    T = g.Keys.Tokenizer
    TT = g.TokenType
    model = tj["model"]
    vocab: Dict[str, int] = model["vocab"]
    added = _added(tj)
    n = _size(list(vocab.values()) + [a["id"] for a in added], vocab_size, root / "tokenizer.json")
    tokens, types = _base_lists(n)
    scores = [-10000.0] * n
    for text, i in vocab.items():
        tokens[i], types[i], scores[i] = text, int(TT.NORMAL), 0.0
        if _BYTE_TOKEN.fullmatch(text):
            types[i] = int(TT.BYTE)
    done = set()
    for rank, (a, b) in enumerate(_merge_pairs(model.get("merges", []))):
        i = vocab.get(a + b)
        if i is not None and i not in done:
            scores[i] = -float(rank)
            done.add(i)
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = int(TT.UNKNOWN)
    for a in added:
        special = a.get("special") or _looks_special(a["content"])
        tokens[a["id"]] = a["content"]
        if a["content"] != unk:
            types[a["id"]] = int(TT.CONTROL if special else TT.USER_DEFINED)
        scores[a["id"]] = 0.0
    prefix = _spm_space_prefix(tj)
    sv = _special_vocab(root, n, merges=False)
    _explicit_add_flags(sv, tj)
    md: List[KeyValue] = [
        (T.MODEL, "string", "llama"), (T.PRE, "string", "default"),
        (T.LIST, "array[string]", tokens), (T.SCORES, "array[float32]", scores),
        (T.TOKEN_TYPE, "array[int32]", types), (T.ADD_PREFIX, "bool", prefix),
    ] + _special_metadata(sv)
    return TokenizerPlan("llama", "default", md, n, notes=[
        f"SentencePiece-style BPE (byte fallback): {len(vocab)} tokens + {len(added)} added, "
        f"scores from {len(done)} merge ranks, space prefix {prefix}"])


def _spm_space_prefix(tj: Dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace prepend or a
    Prepend normalizer), llama.cpp's tokenizer.ggml.add_space_prefix."""
    def walk(node: Any) -> List[Dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        subs = node.get("pretokenizers") or node.get("normalizers") or []
        return [node] + [x for s in subs for x in walk(s)]
    for node in walk(tj.get("pre_tokenizer")) + walk(tj.get("normalizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme")
            return scheme in ("always", "first") if scheme else bool(node.get("add_prefix_space",
                                                                              True))
        if node.get("type") == "Prepend":
            return True
    return False


def _phantom(token: str, control: bool) -> str:
    if control:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _bert(root: Path, vocab: Dict[str, int], special: set, vocab_size: Optional[int],
          type_vocab_size: Optional[int], source: str) -> TokenizerPlan:
    g = _gguf()
    T = g.Keys.Tokenizer
    TT = g.TokenType
    n = _size(list(vocab.values()), vocab_size, root / source)
    tokens, types = _base_lists(n)
    for text, i in vocab.items():
        control = text in special
        tokens[i] = _phantom(text, control)
        types[i] = int(TT.CONTROL if control else TT.NORMAL)
    sv = _special_vocab(root, n, merges=False)
    md: List[KeyValue] = [
        (T.MODEL, "string", "bert"), (T.PRE, "string", "default"),
        (T.LIST, "array[string]", tokens), (T.TOKEN_TYPE, "array[int32]", types),
        (T.TOKEN_TYPE_COUNT, "uint32", int(type_vocab_size or 1)),
    ] + _special_metadata(sv)
    return TokenizerPlan("bert", "default", md, n, notes=[
        f"WordPiece from {source}: {len(vocab)} tokens ({len(special)} control), "
        "phantom-space spelling"])


def _bert_specials(root: Path, tj: Optional[Dict[str, Any]]) -> set:
    if tj is not None:
        return {a["content"] for a in _added(tj) if a.get("special")}
    out = set()
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        p = root / fname
        if p.is_file():
            for k, v in _read_json(p).items():
                if k.endswith("_token"):
                    v = v.get("content") if isinstance(v, dict) else v
                    if isinstance(v, str):
                        out.add(v)
    return out


def plan_tokenizer(root: Path, cfg: Dict[str, Any]) -> TokenizerPlan:
    """The tokenizer.ggml.* keys for the model at `root`."""
    vocab_size = cfg.get("vocab_size")
    vocab_size = int(vocab_size) if vocab_size else None
    tj_path = root / "tokenizer.json"
    if tj_path.is_file():
        tj = _read_json(tj_path)
        kind = tj.get("model", {}).get("type")
        if kind == "WordPiece":
            return _bert(root, tj["model"]["vocab"], _bert_specials(root, tj), vocab_size,
                         cfg.get("type_vocab_size"), "tokenizer.json")
        if kind == "BPE":
            if tj["model"].get("byte_fallback"):
                return _spm(root, tj, vocab_size)
            return _gpt2(root, tj, vocab_size)
        raise ConfigurationError(f"{tj_path}: tokenizer model {kind!r} is not supported for "
                                 "llama.cpp export (BPE or WordPiece)")
    vt = root / "vocab.txt"
    if vt.is_file():
        lines = vt.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {}
        for i, tok in enumerate(lines):
            vocab.setdefault(tok, i)
        return _bert(root, vocab, _bert_specials(root, None), vocab_size,
                     cfg.get("type_vocab_size"), "vocab.txt")
    if (root / "tokenizer.model").is_file():
        raise ConfigurationError(
            f"{root}: only a SentencePiece tokenizer.model and no tokenizer.json; ArrowQuant reads "
            "tokenizer.json (save the tokenizer with transformers' save_pretrained to get one)")
    raise ConfigurationError(f"{root}: no tokenizer (tokenizer.json or vocab.txt): llama.cpp "
                             "needs one; use --gguf-arch generic for a file without")
