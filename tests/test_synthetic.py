"""Synthetic model generator: honest sizes, readable files, determinism, caching."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from arrowquant import synthetic
from arrowquant.synthetic import SIZE_CLASSES, count_params, generate_model, model_spec


@pytest.mark.parametrize("size", list(SIZE_CLASSES))
def test_size_classes_are_within_5_percent(size):
    nominal = SIZE_CLASSES[size].nominal_params
    assert abs(count_params(size) - nominal) <= 0.05 * nominal


def test_7b_has_llama_shapes():
    sc = SIZE_CLASSES["7B"]
    assert (sc.hidden, sc.layers, sc.intermediate, sc.vocab) == (4096, 32, 11008, 32000)
    assert (SIZE_CLASSES["100M"].hidden, SIZE_CLASSES["100M"].layers) == (768, 12)
    assert (SIZE_CLASSES["600M"].hidden, SIZE_CLASSES["600M"].layers) == (1024, 24)


def test_spec_is_llama_shaped():
    spec = dict(model_spec("10M"))
    sc = SIZE_CLASSES["10M"]
    h, i, v = sc.hidden, sc.intermediate, sc.vocab
    assert spec["model.embed_tokens.weight"] == (v, h)
    assert spec["lm_head.weight"] == (v, h)
    assert spec["model.norm.weight"] == (h,)
    last = sc.layers - 1
    assert spec[f"model.layers.{last}.self_attn.q_proj.weight"] == (h, h)
    assert spec[f"model.layers.{last}.mlp.gate_proj.weight"] == (i, h)
    assert spec[f"model.layers.{last}.mlp.down_proj.weight"] == (h, i)
    assert spec[f"model.layers.{last}.post_attention_layernorm.weight"] == (h,)
    assert len(spec) == 3 + 9 * sc.layers
    assert sum(int(np.prod(s)) for s in spec.values()) == count_params("10M")


def test_unknown_size_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        model_spec("3B")
    with pytest.raises(ValueError):
        generate_model(tmp_path / "m", "10M", fmt="gguf")
    with pytest.raises(ValueError):
        generate_model(tmp_path / "m", "10M", modality="video")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def parquet_model(tmp_path_factory) -> Path:
    return generate_model(tmp_path_factory.mktemp("pq") / "model", "10M", fmt="parquet", seed=3)


@pytest.fixture(scope="module")
def safetensors_model(tmp_path_factory) -> Path:
    return generate_model(tmp_path_factory.mktemp("st") / "model", "10M", fmt="safetensors", seed=3)


def test_parquet_v1_layout(parquet_model):
    pf = pq.ParquetFile(parquet_model / "model.parquet")
    spec = model_spec("10M")
    assert pf.metadata.num_row_groups == len(spec)
    assert str(pf.schema_arrow.field("data").type) == "large_binary"
    data_col = pf.schema_arrow.get_field_index("data")
    for rg in range(pf.metadata.num_row_groups):
        assert pf.metadata.row_group(rg).num_rows == 1
        assert not pf.metadata.row_group(rg).column(data_col).is_stats_set
    for rg in (0, 1, len(spec) - 1):
        row = pf.read_row_group(rg).to_pylist()[0]
        name, shape = spec[rg]
        assert row["layer_name"] == name
        assert tuple(row["shape"]) == shape
        assert row["dtype"] == "float16"
        assert row["num_params"] == int(np.prod(shape))
        assert len(row["data"]) == 2 * row["num_params"]
    meta = json.loads((parquet_model / "metadata.json").read_text())
    assert meta["modality"] == "text"
    assert meta["size_class"] == "10M"
    assert meta["params"] == count_params("10M")
    assert meta["seed"] == 3


def test_values_are_realistic(parquet_model):
    pf = pq.ParquetFile(parquet_model / "model.parquet")
    names = [n for n, _ in model_spec("10M")]
    q = pf.read_row_group(names.index("model.layers.0.self_attn.q_proj.weight")).to_pylist()[0]
    w = np.frombuffer(q["data"], np.float16).reshape(q["shape"]).astype(np.float32)
    assert np.isfinite(w).all()
    col_std = w.std(axis=0)
    assert 0.015 < np.median(col_std) < 0.025
    # A few outlier columns, several times the typical scale.
    assert 1 <= (col_std > 4 * np.median(col_std)).sum() <= 0.02 * w.shape[1]
    norm = pf.read_row_group(names.index("model.norm.weight")).to_pylist()[0]
    nw = np.frombuffer(norm["data"], np.float16).astype(np.float32)
    assert abs(nw.mean() - 1.0) < 0.01


def test_safetensors_loads_and_matches_parquet(safetensors_model, parquet_model):
    from safetensors.numpy import load_file

    tensors = load_file(str(safetensors_model / "model.safetensors"))
    spec = model_spec("10M")
    assert set(tensors) == {n for n, _ in spec}
    for name, shape in spec:
        assert tensors[name].shape == shape and tensors[name].dtype == np.float16
    pf = pq.ParquetFile(parquet_model / "model.parquet")
    row = pf.read_row_group(len(spec) - 1).to_pylist()[0]
    assert row["data"] == tensors["lm_head.weight"].tobytes()
    assert json.loads((safetensors_model / "metadata.json").read_text())["modality"] == "text"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic_for_a_seed(tmp_path, safetensors_model):
    again = generate_model(tmp_path / "again", "10M", fmt="safetensors", seed=3)
    other = generate_model(tmp_path / "other", "10M", fmt="safetensors", seed=4)
    assert _digest(again / "model.safetensors") == _digest(safetensors_model / "model.safetensors")
    assert _digest(other / "model.safetensors") != _digest(again / "model.safetensors")


def test_block_size_does_not_change_values(monkeypatch):
    name, shape = "model.layers.0.mlp.down_proj.weight", (256, 1536)
    whole = np.concatenate(list(synthetic.tensor_blocks(name, shape, 0)))
    monkeypatch.setattr(synthetic, "BLOCK_ELEMENTS", 1536 * 7)
    blocks = list(synthetic.tensor_blocks(name, shape, 0))
    assert len(blocks) > 1
    assert np.array_equal(np.concatenate(blocks), whole)


def test_cached_and_regenerated_on_change(tmp_path, monkeypatch):
    out = generate_model(tmp_path / "m", "10M", fmt="safetensors", seed=1)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(synthetic, "_write_safetensors",
                        lambda *a, **k: calls.append(a) or Path(a[0]).write_bytes(b""))
    assert generate_model(out, "10M", fmt="safetensors", seed=1) == out
    assert calls == []
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # A different seed is a different model: regenerated in place.
    generate_model(out, "10M", fmt="safetensors", seed=2)
    assert len(calls) == 1
    assert json.loads((out / synthetic.MANIFEST_NAME).read_text())["seed"] == 2


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_model(tmp_path / "m", "10M")
    assert list(tmp_path.iterdir()) == []


def test_killed_run_temp_is_cleaned_up(tmp_path):
    import subprocess
    import sys

    # A pid that has surely exited: a finished child's.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".m.tmp-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".m.tmp-{os.getppid()}"  # the parent of this process is alive
    live.mkdir()
    generate_model(tmp_path / "m", "10M", fmt="safetensors")
    assert not stale.exists() and live.exists()
    assert synthetic.read_manifest(tmp_path / "m") is not None


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_model(tmp_path / "m", "10M")
    assert (tmp_path / "m" / "mine.txt").read_text() == "user data"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "parquet"])
def test_generation_memory_is_bounded(tmp_path, fmt):
    """A 100M model (201 MB of float16) is written in far less memory than its size."""
    import subprocess
    import sys

    from arrowquant.synthetic import model_bytes

    out = tmp_path / "m"
    code = ("import resource, sys; from arrowquant.synthetic import generate_model; "
            "import pyarrow.parquet, numpy; base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"generate_model(sys.argv[1], '100M', fmt='{fmt}'); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    growth_mb = float(p.stdout.strip())
    # Bounded by row blocks (16 MiB float32 scratch + its cast) for SafeTensors; for Parquet
    # also by the largest tensor (one cell, plus the writer's page copy), never the model.
    largest_mb = max(int(np.prod(s)) for _, s in model_spec("100M")) * 2 / 1e6
    bound = 64 if fmt == "safetensors" else 48 + 3 * largest_mb
    assert growth_mb < bound < model_bytes("100M") / 1e6 / 2, (growth_mb, bound)
    assert synthetic.read_manifest(out)["params"] == count_params("100M")
