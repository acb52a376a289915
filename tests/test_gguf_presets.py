"""llama.cpp's presets by name (Q4_K_M, ...) on the LLM path, llama.cpp's
fallbacks for rows that are no whole number of 256-blocks, --keep /
--bits-for with --format gguf, --target-bpw (measured per-tensor types under
a bit budget) and --calibration weighting the GGUF search.

The expected types are spelled out here from llama.cpp's rules
(src/llama-quant.cpp, docs/gguf.md "Presets"), not computed by the code
under test. The models are random Llama directories written with numpy
(gguf_models.build_numpy_llama): fast, no torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import gguf  # noqa: E402

import gguf_models as gm  # noqa: E402
from arrowquant.cli import main  # noqa: E402
from arrowquant.errors import ConfigurationError  # noqa: E402
from arrowquant.formats.gguf import export as ge  # noqa: E402
from arrowquant.formats.gguf.presets import use_more_bits  # noqa: E402

LAYERS = 16
#: use_more_bits(i, 16): i < 2, i >= 14, (i - 2) % 3 == 2.
MORE_BITS_16 = {0, 1, 4, 7, 10, 13, 14, 15}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """16 layers, rows of 256 / 512, 8 query heads on 2 kv heads (gqa 4)."""
    return gm.build_numpy_llama(tmp_path_factory.mktemp("np-llama") / "m", layers=LAYERS)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """Rows of 160 (a multiple of 32, not of 256), tied embeddings."""
    return gm.build_numpy_llama(tmp_path_factory.mktemp("np-odd") / "m", hidden=160,
                                intermediate=256, layers=8, heads=5, kv_heads=5, tied=True)


def _types(report):
    return {r["name"]: r["gguf_type"] for r in report["tensors_detail"]}


def _expected(preset: str, name: str) -> str:
    """llama.cpp's type of `name` in the `llama` fixture (untied, gqa 4, 16 layers)."""
    if name.endswith("norm.weight"):
        return "F32"
    if name == "output.weight":
        return "Q8_0" if preset == "Q8_0" else "Q6_K"
    base = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
            "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
            "Q6_K": "Q6_K", "Q8_0": "Q8_0", "IQ4_XS": "IQ4_XS"}[preset]
    if name == "token_embd.weight":
        return base
    i = int(name.split(".")[1])
    if ".attn_v." in name:
        return {"Q2_K": "Q4_K",  # gqa >= 4
                "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
                "IQ4_XS": "Q5_K",  # gqa >= 4
                "Q4_K_M": "Q6_K" if i in MORE_BITS_16 else base,
                "Q5_K_M": "Q6_K" if i in MORE_BITS_16 else base,
                "Q4_K_S": "Q5_K" if i < 4 else base}.get(preset, base)
    if ".ffn_down." in name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < 1 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if i in MORE_BITS_16 else base,
                "IQ4_XS": "Q5_K" if i < 2 else base,
                "Q5_K_M": "Q6_K" if i in MORE_BITS_16 else base,
                "Q4_K_S": "Q5_K" if i < 2 else base}.get(preset, base)
    if ".attn_output." in name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, base)
    return base


def test_use_more_bits_is_llama_cpps_pattern():
    assert {i for i in range(16) if use_more_bits(i, 16)} == MORE_BITS_16
    # 32 layers (a 7B Llama): the first and last 4, and every third from 6
    assert [i for i in range(32) if use_more_bits(i, 32)] == \
        [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q8_0",
                                    "IQ4_XS", "Q4_K_S", "Q5_K_S", "Q3_K_S", "Q3_K_L"])
def test_preset_types_follow_llama_cpp(llama, tmp_path, preset):
    path = tmp_path / f"{preset}.gguf"
    report = ge.export_gguf(llama, path, gguf_type=preset)
    got = _types(report)
    want = {name: _expected(preset, name) for name in got}
    assert got == want
    assert report["preset"] == preset
    reader = gguf.GGUFReader(str(path))
    ft = reader.fields["general.file_type"]
    assert int(ft.parts[ft.data[0]][0]) == int(gguf.LlamaFileType["MOSTLY_" + preset])
    for t in reader.tensors:  # the bytes are of the types the report names
        assert t.tensor_type.name == got[t.name]


def test_fallbacks_for_rows_of_160(odd, tmp_path):
    """Rows of 160: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K ->
    Q4_0, IQ4_XS -> IQ4_NL; the tied token_embd (the output) -> Q8_0."""
    expect = {"Q4_K_M": ("Q5_0", "Q8_0"), "Q5_K_S": ("Q5_1", "Q5_1"), "Q6_K": ("Q8_0", "Q8_0"),
              "Q3_K_S": ("Q4_0", "Q4_0"), "Q2_K": ("Q4_0", "Q4_0"),
              "IQ4_XS": ("IQ4_NL", "IQ4_NL")}
    for preset, (attn_q, attn_v0) in expect.items():
        report = ge.export_gguf(odd, tmp_path / f"{preset}.gguf", gguf_type=preset)
        t = _types(report)
        assert t["token_embd.weight"] == "Q8_0", preset
        assert "output.weight" not in t
        assert t["blk.3.attn_q.weight"] == attn_q, preset
        assert t["blk.3.ffn_up.weight"] == attn_q, preset
        assert t["blk.0.attn_v.weight"] == attn_v0, preset  # Q4_K_M: Q6_K -> Q8_0
        # ffn_down's rows are 256: no fallback there
        assert t["blk.3.ffn_down.weight"] in ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K",
                                              "IQ4_XS"), preset
        assert "blk.3.attn_q.weight" in report["fallbacks"]
        reason = next(r["reason"] for r in report["tensors_detail"]
                      if r["name"] == "blk.3.attn_q.weight")
        assert "not a multiple of 256" in reason and "fallback" in reason


def test_presets_need_a_llama_cpp_architecture(llama, tmp_path):
    with pytest.raises(ConfigurationError, match="Q4_K_M is a per-tensor mix"):
        ge.export_gguf(llama / "model.safetensors", tmp_path / "x.gguf", gguf_type="Q4_K_M",
                       arch="generic")


def test_keep_and_bits_for_with_format_gguf(llama, tmp_path):
    """--keep / --bits-for were dropped with --format gguf: every matrix got
    the one type. Now they decide first."""
    out = tmp_path / "kb.gguf"
    rc = main(["quantize", str(llama), str(out), "--format", "gguf", "--gguf-type", "Q4_K_M",
               "--keep", "*layers.3.self_attn.v_proj*", "--bits-for", "re:mlp\\.up_proj=8",
               "--bits-for", "*layers.5.*=2", "--no-progress"])
    assert rc == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.3.attn_v.weight"] == "F32"        # kept (float32 source)
    assert all(types[f"blk.{i}.ffn_up.weight"] == "Q8_0" for i in range(LAYERS))
    assert types["blk.5.ffn_gate.weight"] == "Q2_K"     # first match: 5's up stays Q8_0
    assert types["blk.5.ffn_up.weight"] == "Q8_0"
    assert types["blk.6.ffn_gate.weight"] == "Q4_K"     # the preset elsewhere
    assert types["blk.7.attn_v.weight"] == "Q6_K"
    # export-gguf takes them too
    out2 = tmp_path / "eg.gguf"
    assert main(["export-gguf", str(llama), str(out2), "--gguf-type", "Q6_K", "--keep",
                 "*embed_tokens*", "--bits-for", "blk.2.*=4", "--no-progress"]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out2)).tensors}
    assert types["token_embd.weight"] == "F32" and types["blk.2.ffn_up.weight"] == "Q4_K"
    assert types["blk.3.ffn_up.weight"] == "Q6_K"
    # The API takes llama.cpp names too; the raw export refuses rather than drops them.
    r = ge.export_gguf(llama, tmp_path / "api.gguf", gguf_type="Q8_0", keep=["blk.0.attn_q.*"])
    assert _types(r)["blk.0.attn_q.weight"] == "F32"
    with pytest.raises(ConfigurationError, match="--keep, --bits-for"):
        ge.export_gguf(llama / "model.safetensors", tmp_path / "raw.gguf", arch="generic",
                       keep=["*q_proj*"])


def _total_error(report):
    return sum(r["rel_mse"] * 1.0 for r in report["tensors_detail"] if r["rel_mse"])


def test_target_bpw_meets_the_budget_and_spends_it(tmp_path):
    llama = gm.build_numpy_llama(tmp_path / "m", layers=4)
    reports = {}
    for bpw in (3.5, 4.8, 6.0):
        r = ge.export_gguf(llama, tmp_path / f"b{bpw}.gguf", target_bpw=bpw)
        reports[bpw] = r
        assert r["bits_per_weight"] <= bpw + 1e-9
        assert r["bits_per_weight"] > bpw - 0.25, r["bits_per_weight"]
        assert r["allocation"]["target_bpw"] == bpw
        for t in r["tensors_detail"]:
            if t["gguf_type"] != "F32":
                assert t["reason"].startswith(f"--target-bpw {bpw:g}: {t['gguf_type']} (measured")
    assert _total_error(reports[3.5]) > _total_error(reports[4.8]) > _total_error(reports[6.0])
    # Patterns pin their tensors; the budget covers the rest.
    r = ge.export_gguf(llama, tmp_path / "pin.gguf", target_bpw=4.8,
                       bits_for={"*embed_tokens*": 8})
    assert _types(r)["token_embd.weight"] == "Q8_0" and r["bits_per_weight"] <= 4.8
    with pytest.raises(ConfigurationError, match="below what this file can be"):
        ge.export_gguf(llama, tmp_path / "low.gguf", target_bpw=2.1)


def test_target_bpw_gives_more_bits_to_the_harder_tensor(tmp_path):
    """A tensor with heavy-tailed values loses more at few bits: the budget
    goes to it first."""
    from safetensors.numpy import load_file, save_file

    d = gm.build_numpy_llama(tmp_path / "m", layers=2)
    w = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(3)
    w["model.layers.1.mlp.up_proj.weight"] = (rng.standard_t(2, size=(512, 256)) * 0.02
                                              ).astype(np.float32)
    save_file(w, str(d / "model.safetensors"))
    r = ge.export_gguf(d, tmp_path / "t.gguf", target_bpw=4.0)
    bpw = {"Q2_K": 2.625, "Q3_K": 3.4375, "IQ4_XS": 4.25, "Q4_K": 4.5, "Q5_K": 5.5,
           "Q6_K": 6.5625, "Q8_0": 8.5}
    t = _types(r)
    assert bpw[t["blk.1.ffn_up.weight"]] >= bpw[t["blk.0.ffn_up.weight"]]


def test_calibration_weights_the_gguf_search(llama, tmp_path):
    from arrowquant.calibration.stats import CalibrationStats, GroupStats

    rng = np.random.default_rng(0)
    groups = {}
    for i in range(LAYERS):
        for m, cols in (("self_attn.q_proj", 256), ("mlp.down_proj", 512)):
            ms = (rng.gamma(0.5, size=cols) + 1e-3).astype(np.float32)
            groups[f"model.layers.{i}.{m}"] = {0: GroupStats(16, np.zeros(cols, np.float32), ms,
                                                             np.sqrt(ms))}
    stats = CalibrationStats(groups=groups, num_time_groups=1)
    plain = ge.export_gguf(llama, tmp_path / "p.gguf", gguf_type="IQ4_XS")
    cal = ge.export_gguf(llama, tmp_path / "c.gguf", gguf_type="IQ4_XS", calibration=stats)
    weighted = set(cal["importance_weighted"])
    assert weighted == {f"blk.{i}.{n}.weight" for i in range(LAYERS)
                        for n in ("attn_q", "ffn_down")}
    assert not plain["importance_weighted"]
    # llama.cpp's IQ4_XS rule: ffn_down's first eighth at Q5_K only without an imatrix
    assert _types(plain)["blk.0.ffn_down.weight"] == "Q5_K"
    assert _types(cal)["blk.0.ffn_down.weight"] == "IQ4_XS"
    # the weighted search lowers the weighted error on the tensor
    from safetensors.numpy import load_file

    x = load_file(str(llama / "model.safetensors"))["model.layers.2.self_attn.q_proj.weight"]
    w = groups["model.layers.2.self_attn.q_proj"][0].mean_sq
    errs = []
    for path in (tmp_path / "p.gguf", tmp_path / "c.gguf"):
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.2.attn_q.weight")
        y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
        errs.append(_perm_weighted_error(x, y, w))
    assert errs[1] < errs[0]


def _perm_weighted_error(x, y, w):
    """sum_c w_c (x - y)^2 with y's rows matched to x's (llama.cpp's Q/K row
    permutation): each row of y against its nearest row of x."""
    d = ((y[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    idx = d.argmin(1)
    return float((((x[idx] - y) ** 2) * w).sum())


def test_diffusion_keep_and_bits_for_are_honored():
    """The diffusion layouts get --keep / --bits-for as a type override."""
    from arrowquant.formats.gguf.allocate import diffusion_override
    from arrowquant.formats.gguf.diffusion_types import TypeDecision

    class T:
        name, source_names, dtype, shape = "blocks.0.attn.to_q.weight", ("unet.x",), "float16", \
            (320, 320)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        over = diffusion_override(["*to_q*"], {})
        d = over(T(), TypeDecision("Q4_K", "target", "x"))
        assert d.gguf_type == "F16" and "--keep" in d.reason
        over = diffusion_override([], {"unet.*": 4})
        d = over(T(), TypeDecision("Q8_0", "target", "x"))
        assert d.gguf_type == "Q5_0" and d.fallback  # 320 is no multiple of 256


def test_quantize_format_gguf_takes_a_calibration_file(tmp_path, capsys):
    """`quantize --format gguf --calibration STATS`: the statistics file
    weights the block search of the tensors it covers."""
    import pyarrow as pa

    from arrowquant.calibration.stats import _list_array, write_stats

    d = gm.build_numpy_llama(tmp_path / "m", layers=2)
    rng = np.random.default_rng(1)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    cols = [512, 256]
    ms = [(rng.gamma(0.5, size=c) + 1e-3).astype(np.float32) for c in cols]
    table = pa.table({"layer": layers, "time_group": [0, 0], "count": [8, 8],
                      "mean": _list_array([np.zeros(c, np.float32) for c in cols]),
                      "mean_sq": _list_array(ms), "absmax": _list_array([np.sqrt(m) for m in ms])})
    stats = write_stats(table, tmp_path / "stats.parquet", {"num_time_groups": 1})
    out = tmp_path / "c.gguf"
    assert main(["quantize", str(d), str(out), "--format", "gguf", "--gguf-type", "Q4_K_M",
                 "--calibration", str(stats), "--json", "--no-progress"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert sorted(report["importance_weighted"]) == ["blk.0.ffn_down.weight",
                                                     "blk.1.attn_output.weight"]
    assert report["preset"] == "Q4_K_M"
