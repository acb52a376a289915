"""The PyTorch runtime: the C++ quantized matmul behind torch operators
against dequantize + a float64 matmul (within the derived bound of
tests/runtime_bound.py) on every storage variant and path, QuantConv2d and
QuantEmbedding against the dequantized float layers, torch.compile /
inference_mode, and the one-call loaders on a tiny Llama and a tiny
StableDiffusion pipeline (outputs equal to the float model holding the
dequantized weights; no float copy of a quantized weight resident)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq

torch = pytest.importorskip("torch")
aqt = pytest.importorskip("arrowquant.torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arrowquant import _core  # noqa: E402
from arrowquant.formats.v2_reader import StoredSuperblockTensor  # noqa: E402
from arrowquant.runtime import ops  # noqa: E402
from runtime_bound import U, assert_within_bound, exact_and_bound, expanded_params  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional


def quantized(rows, cols, bits, g, storage, scheme, seed=0, equalize=False):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.02, 0.02, (rows, 1)))
    w = w.astype(np.float32)
    s = rng.uniform(0.3, 3.0, cols).astype(np.float32) if equalize else None
    stored = w * s[None, :] if equalize else w
    qt = aq.quantize_array(np.ascontiguousarray(stored), bits=bits, group_size=g, scheme=scheme,
                           param_dtype=storage)
    return qt, s


def call_kernel(layer, x, bias, path, isa):
    """The C++ kernel directly, on a given path (gemv / gemm / torch BLAS panels)."""
    x2 = x.reshape(-1, layer.cols).contiguous()
    if path == "blas":
        old = ops.policy()
        ops.set_policy(blas_min_batch=1, gemv_max_batch=0, panel_bytes=4 * layer.cols * 16)
        try:
            y = layer(x2)
        finally:
            ops.set_policy(**old.__dict__)
        return y
    y = torch.empty(x2.shape[0], layer.rows, dtype=x2.dtype)
    _core.quant_matmul(x2, layer.qweight, layer.scales, layer.zero_points, layer.param_codes,
                       layer.input_scales, bias, y, layer.rows, layer.cols, layer.bits,
                       layer.group_size, layer.param_dtype, layer.param_code_bits,
                       layer.superblock_groups, threads=2, path=path,
                       force_scalar=isa == "scalar", force_avx2=isa == "avx2")
    return y


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([2, 4, 8]), g=st.sampled_from([16, 32, 64, 128, 256, 7, 24, 50]),
       storage=st.sampled_from(["float32", "float16", "superblock"]),
       symmetric=st.booleans(), rows=st.integers(1, 40), cols=st.integers(1, 520),
       batch=st.sampled_from([1, 2, 3, 4, 5, 9, 17, 40]),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]), equalize=st.booleans(),
       with_bias=st.booleans(), path=st.sampled_from(["gemv", "gemm", "blas"]),
       isa=st.sampled_from(["best", "avx2", "scalar"]), seed=st.integers(0, 2 ** 16))
def test_kernel_matches_dequantize_matmul(bits, g, storage, symmetric, rows, cols, batch, dtype,
                                          equalize, with_bias, path, isa, seed):
    scheme = "symmetric" if symmetric and storage != "superblock" else "asymmetric"
    qt, s = quantized(rows, cols, bits, g, storage, scheme, seed, equalize)
    layer = aqt.QuantLinear.from_quantized(qt, input_scales=s)
    # The layer's weight is the engine's dequantization / s, bit for bit.
    ref_w = aq.dequantize_array(qt) if s is None else aq.dequantize_array(qt) / s[None, :]
    assert layer.dequantize_weight().numpy().tobytes() == ref_w.astype(np.float32).tobytes()
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cols, generator=gen).to(dt)
    bias = (torch.randn(rows, generator=gen) * 0.1).to(dt) if with_bias else None
    if path == "blas" and bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    y = call_kernel(layer, x, bias, path, isa)
    assert y.dtype == dt and tuple(y.shape) == (batch, rows)
    exact, bound = exact_and_bound(layer, x.float(), bias, out_dtype=dt)
    assert_within_bound(y, exact, bound, f"{storage} {bits}-bit g{g} {path}")


@pytest.mark.parametrize("storage", ["float32", "float16", "superblock"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_storage_on_every_path_large(storage, bits):
    qt, s = quantized(96, 1024, bits, 128 if storage != "superblock" else 32, storage,
                      "asymmetric", seed=bits, equalize=storage == "float16")
    layer = aqt.QuantLinear.from_quantized(qt, input_scales=s, bias=torch.randn(96) * 0.1)
    for batch in (1, 3, 8, 64):
        x = torch.randn(batch, 1024)
        exact, bound = exact_and_bound(layer, x, layer.bias)
        for path in ("gemv", "gemm"):
            for isa in ("best", "avx2", "scalar"):
                y = call_kernel(layer, x, layer.bias, path, isa)
                assert_within_bound(y, exact, bound, f"{path} {isa}")
        assert_within_bound(layer(x), exact, bound, "auto")


def test_stored_superblock_layout_other_than_the_engines():
    """A file may use other code bits / groups per super-block (readers take
    them from the file): 8-bit code pairs here instead of the engine's 6."""
    qt, _ = quantized(20, 256, 4, 32, "superblock", "asymmetric", seed=3)
    fields = {k: getattr(qt, k) for k in ("data", "scales", "zero_points", "shape", "dtype",
                                          "bits", "group_size", "scheme", "method",
                                          "param_dtype", "name", "superblock_scales",
                                          "superblock_zero_points")}
    stored = StoredSuperblockTensor(**fields, stored_code_bits=8,
                                    stored_superblock_groups=qt.superblock_groups)
    layer = aqt.QuantLinear.from_quantized(stored)
    assert layer.param_code_bits == 8 and layer.param_codes.numel() == 20 * 8 * 2
    x = torch.randn(3, 256)
    exact, bound = exact_and_bound(layer, x, None)
    assert_within_bound(layer(x), exact, bound, "p=8")
    assert layer.dequantize_weight().numpy().tobytes() == aq.dequantize_array(qt).tobytes()


def test_resident_bytes_are_the_stored_precision():
    for storage, per_group in (("float32", 8), ("float16", 4)):
        qt, _ = quantized(64, 512, 4, 64, storage, "asymmetric")
        layer = aqt.QuantLinear.from_quantized(qt)
        assert aqt.module_weight_bytes(layer) == 64 * 256 + 64 * 8 * per_group
        assert aqt.module_weight_bytes(layer) == qt.nbytes
    qt, _ = quantized(64, 512, 4, 32, "superblock", "asymmetric")
    layer = aqt.QuantLinear.from_quantized(qt)
    assert aqt.module_weight_bytes(layer) == qt.nbytes  # codes + units + the packed code stream


def test_tolerance_is_tight_enough_to_see_one_wrong_code():
    qt, _ = quantized(4, 128, 4, 32, "float32", "asymmetric")
    layer = aqt.QuantLinear.from_quantized(qt)
    x = torch.ones(1, 128)
    exact, bound = exact_and_bound(layer, x, None)
    layer.qweight[0, 3] ^= 1  # one code of row 0 moves by one step
    err = (layer(x).double() - exact).abs()
    assert err[0, 0] > 4 * bound[0, 0] and (err[0, 1:] <= bound[0, 1:]).all()


@pytest.mark.parametrize("policy", ["dequantize", "unfold", "auto"])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=1, padding=0), dict(kernel_size=1, stride=2, padding=0),
    dict(kernel_size=(3, 2), stride=1, padding=(1, 0), dilation=2),
    dict(kernel_size=3, stride=1, padding=1, groups=2),
])
@pytest.mark.parametrize("storage", ["float16", "superblock"])
def test_quant_conv2d_matches_dequantized_conv(policy, geometry, storage):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, **geometry).requires_grad_(False)
    w = conv.weight.detach().numpy()
    qt = aq.quantize_array(np.ascontiguousarray(w), bits=4, group_size=16, param_dtype=storage)
    q = aqt.QuantConv2d.from_quantized(qt, conv, bias=conv.bias)
    old = ops.policy()
    ops.set_policy(conv=policy)
    try:
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 8, 9, 11).to(dt)
            got = q(x)
            w_hat = q.dequantize_weight().double().view(q.weight_shape)
            g = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                     groups=conv.groups)
            exact = F.conv2d(x.double(), w_hat, conv.bias.double(), **g)
            s, z = expanded_params(q)
            idx = torch.arange(q.cols) // q.group_size
            from arrowquant.runtime.layers import unpack_codes
            m = ((unpack_codes(q.qweight, 4, q.cols).double() + z.double()[:, idx].abs())
                 * s.double()[:, idx].abs()).view(q.weight_shape)
            mag = F.conv2d(x.double().abs(), m, conv.bias.double().abs(), **g)
            n = q.cols + s.shape[1] + 32
            bound = (n * U / (1 - n * U) + 4 * U) * mag
            if dt == torch.bfloat16:
                bound = bound + 2.0 ** -8 * (exact.abs() + bound)
            assert got.dtype == dt and got.shape == exact.shape
            assert_within_bound(got, exact, bound, f"conv {geometry} {policy} {dt}")
    finally:
        ops.set_policy(**old.__dict__)
    assert aqt.module_weight_bytes(q) == qt.nbytes + 12 * 4  # packed weight + float32 bias


def test_quant_embedding_equals_the_dequantized_table():
    qt, _ = quantized(50, 40, 4, 16, "superblock", "asymmetric")
    emb = aqt.QuantEmbedding.from_quantized(qt, dtype=torch.float32)
    ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
    table = torch.from_numpy(aq.dequantize_array(qt))
    assert torch.equal(emb(ids), F.embedding(ids, table))
    assert emb.weight.shape == (50, 40)
    with pytest.raises(aq.ValidationError):
        emb(torch.tensor([50]))


def test_inference_mode_and_torch_compile_trace_without_graph_break():
    qt1, _ = quantized(32, 64, 4, 32, "float16", "asymmetric", seed=1)
    qt2, _ = quantized(16, 32, 8, 32, "superblock", "asymmetric", seed=2)
    model = torch.nn.Sequential(aqt.QuantLinear.from_quantized(qt1, bias=torch.randn(32)),
                                torch.nn.GELU(), aqt.QuantLinear.from_quantized(qt2))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no break
    with torch.no_grad():
        assert torch.equal(compiled(x), eager)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    torch.compile(model, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1
    assert counter.op_count >= 3  # two quant_linear calls and the GELU in one graph


@pytest.mark.slow
def test_torch_compile_inductor():
    qt, _ = quantized(32, 64, 4, 32, "float16", "asymmetric", seed=1)
    layer = aqt.QuantLinear.from_quantized(qt, bias=torch.randn(32))
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- loaders

def tiny_llama_dir(tmp_path: Path, tie: bool = False, **sizes):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=64,
                                             intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64), **sizes},
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / ("llama-tied" if tie else "llama")
    model.save_pretrained(d, max_shard_size="200KB")
    return transformers, model, d


def dequantized_float_model(cls_or_factory, qdir: Path):
    """The original architecture holding the file's dequantized weights."""
    model = cls_or_factory()
    missing, unexpected = model.load_state_dict(aqt.load_state_dict(qdir, dtype=torch.float32),
                                                strict=False)
    assert not unexpected
    return model.eval()


@pytest.mark.parametrize("tie,bits,storage", [(False, 4, "float16"), (True, 8, "superblock")])
def test_tiny_llama_load_model_generates_as_the_dequantized_model(tmp_path, tie, bits, storage):
    transformers, model, d = tiny_llama_dir(tmp_path, tie=tie)
    out = tmp_path / "q"
    aq.quantize(d, out, bits=bits, group_size=32, param_dtype=storage, progress=False)
    q = aqt.load_model(out)
    assert isinstance(q, transformers.LlamaForCausalLM)
    assert isinstance(q.model.layers[0].self_attn.q_proj, aqt.QuantLinear)
    assert isinstance(q.model.embed_tokens, aqt.QuantEmbedding)
    assert isinstance(q.lm_head, aqt.QuantLinear)
    if tie:  # the output projection shares the embedding's packed buffers
        assert q.lm_head.qweight.data_ptr() == q.model.embed_tokens.qweight.data_ptr()
    report = q._arrowquant_report
    assert not report.dequantized and not report.unused
    ref = dequantized_float_model(lambda: transformers.LlamaForCausalLM(model.config), out)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, exp = q(ids).logits, ref(ids).logits
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
        gen_q = q.generate(ids[:1], max_new_tokens=8, do_sample=False)
        gen_r = ref.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(gen_q, gen_r)
    # A broken weight is seen: the comparison is not vacuous.
    q.model.layers[0].mlp.up_proj.qweight[:, :4] ^= 0x11
    with torch.inference_mode():
        assert (q(ids).logits - exp).abs().max() > 1e-3


def make_tiny_sd_pipeline(root: Path) -> Path:
    """StableDiffusionPipeline from tiny configs (random weights), with a CLIP
    text encoder and a byte-level CLIP tokenizer built offline."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok_dir = root / "tok-src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                     model_max_length=77)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def run_pipe(pipe):
    return pipe("a red cat", num_inference_steps=2, generator=torch.manual_seed(0),
                output_type="np", height=16, width=16).images


@pytest.mark.parametrize("bits", [8, 4])
def test_tiny_sd_pipeline_load_pipeline_matches_the_dequantized_pipeline(sd_pipeline, tmp_path,
                                                                         bits):
    diffusers = pytest.importorskip("diffusers")
    from arrowquant.diffusers import load_component, load_pipeline

    out = tmp_path / f"q{bits}"
    aq.quantize(sd_pipeline, out, bits=bits, group_size=16, progress=False)
    pipe = load_pipeline(out)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline)
    assert isinstance(pipe.unet.conv_in, aqt.QuantConv2d)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q, aqt.QuantLinear)
    assert isinstance(pipe.vae.decoder.conv_out, aqt.QuantConv2d)
    assert isinstance(pipe.text_encoder.embeddings.token_embedding, aqt.QuantEmbedding)
    for comp in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not comp._arrowquant_report.dequantized and not comp._arrowquant_report.unused
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_pipeline)
    for name in ("unet", "vae", "text_encoder"):
        getattr(ref, name).load_state_dict(aqt.load_state_dict(out / name, dtype=torch.float32))
    with torch.inference_mode():
        got, exp = run_pipe(pipe), run_pipe(ref)
    assert np.abs(got - exp).max() < 2e-4, np.abs(got - exp).max()
    unet = load_component(out / "unet")
    assert type(unet).__name__ == "UNet2DConditionModel"


def test_pipeline_weights_stay_packed(sd_pipeline, tmp_path):
    from arrowquant.diffusers import load_component

    out = tmp_path / "q4"
    summary = aq.quantize(sd_pipeline / "unet", out, bits=4, group_size=32, progress=False)
    unet = load_component(out)
    qm = aq.load(out)
    quantized = {n: e for n, e in qm.entries.items() if e.quant_type != "none"}
    # No parameter or buffer is a float tensor the size of a quantized weight.
    sizes = {int(np.prod(e.shape)) for e in quantized.values()}
    for name, t in list(unet.named_parameters()) + list(unet.named_buffers()):
        if t.is_floating_point() and t.dtype == torch.float32:
            assert t.numel() not in sizes or t.dim() == 1, name
    packed = aqt.module_weight_bytes(unet)
    assert abs(packed - summary.output_bytes) / summary.output_bytes < 0.05, \
        (packed, summary.output_bytes)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil, torch, transformers
    import transformers.models.llama.modeling_llama  # imported before the baseline
    import arrowquant.torch as aqt
    from arrowquant.runtime import loaders, layers, ops  # noqa: F401
    import arrowquant as aq
    # Warm-up: the first Parquet read and kernel call page in library code
    # (tens of MB of shared-library text, a fixed cost, not the model's).
    qm = aq.load(sys.argv[1])
    small = min((e for e in qm.entries.values() if e.quant_type != "none"),
                key=lambda e: e.num_params)
    layer = aqt.QuantLinear.from_quantized(qm.raw(small.name))
    layer(torch.randn(2, layer.in_features)); layer(torch.randn(8, layer.in_features))
    qm[[n for n, e in qm.entries.items() if e.quant_type == "none"][0]]
    del qm, layer
    proc = psutil.Process()
    base = proc.memory_info().rss
    model = aqt.load_model(sys.argv[1])
    # VmHWM: this process's own peak (ru_maxrss would include the pytest
    # parent's resident set, inherited across fork + exec).
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    peak = int(hwm.split()[1]) * 1024
    print(json.dumps({"base": base, "peak": peak, "rss": proc.memory_info().rss,
                      "weights": aqt.module_weight_bytes(model)}))
""")


def test_load_model_peak_memory_stays_near_the_quantized_size(tmp_path):
    """Llamas of 4 and 12 layers (81 and 183 MB of float32 weights), INT4,
    each loaded in a fresh process: the resident weights are the file's
    quantized bytes, and the peak grows with the model by about the packed
    size per layer, not the float size (the rest is a fixed cost: module
    objects, allocator arenas, about 30-40 MB here)."""
    runs = {}
    for layers in (4, 12):
        transformers, model, d = tiny_llama_dir(tmp_path / f"l{layers}", vocab_size=8192,
                                                hidden_size=512, intermediate_size=1408,
                                                num_hidden_layers=layers, num_attention_heads=8,
                                                num_key_value_heads=4)
        float_bytes = sum(p.numel() * 4 for p in model.parameters())
        del model
        out = tmp_path / f"q{layers}"
        aq.quantize(d, out, bits=4, group_size=32, method="rtn", progress=False)
        file_bytes = sum(r["output_bytes"] for r in
                         json.loads((out / "quantization_report.json").read_text())["tensors"])
        env = dict(os.environ, PYTHONPATH=str(Path(aq.__file__).resolve().parents[1]))
        r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(out)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads(r.stdout.strip().splitlines()[-1])
        assert abs(m["weights"] - file_bytes) / file_bytes < 0.05, (m, file_bytes)
        runs[layers] = (m["peak"] - m["base"], file_bytes, float_bytes)
    (g4, f4, fl4), (g12, f12, fl12) = runs[4], runs[12]
    # Per extra byte of packed weights the peak grows by about one byte
    # (a float copy would add float_bytes / file_bytes = 6.4 bytes).
    slope = (g12 - g4) / (f12 - f4)
    print("peak growth, packed bytes, float bytes by layers:", runs, "slope", slope)
    assert slope < 2.0, (runs, slope)
    assert g12 < 0.5 * fl12, runs
