"""Shared fixtures: small models written by hand in the formats the tool reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

V1_SCHEMA = pa.schema([
    ("layer_name", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("dtype", pa.string()),
    ("data", pa.large_binary()),
    ("num_params", pa.int64()),
])


def write_v1(path: Path, tensors: Dict[str, np.ndarray], modality: str = "text",
             dtype_names: Dict[str, str] = None) -> Path:
    """Parquet V1 (FORMAT.md section 4), one row group per tensor."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, a in tensors.items():
        dtype = (dtype_names or {}).get(name, a.dtype.name)
        rows.append({"layer_name": name, "shape": list(a.shape), "dtype": dtype,
                     "data": np.ascontiguousarray(a).tobytes(), "num_params": int(a.size)})
    pq.write_table(pa.Table.from_pylist(rows, schema=V1_SCHEMA), path / "model.parquet",
                   row_group_size=1)
    (path / "metadata.json").write_text(json.dumps({"modality": modality}))
    return path


def small_tensors(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": (rng.standard_normal((500, 64)) * 0.02).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float16),
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((300, 64)) * 0.05).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(64, dtype=np.float16),
        "model.layers.0.conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float16),
        "lm_head.weight": (rng.standard_normal((500, 64)) * 0.02).astype(np.float16),
    }


@pytest.fixture
def v1_model(tmp_path: Path) -> Tuple[Path, Dict[str, np.ndarray]]:
    tensors = small_tensors()
    return write_v1(tmp_path / "v1", tensors), tensors


def family_matrix(seed: int, rows: int, cols: int, family: str) -> np.ndarray:
    """float32 test matrices with the shapes parameter searches must handle:
    gauss, student (heavy tails), outlier (a few columns 30x), offset (far
    from 0), negative (large zero points), ties (repeated values), zeros
    (mostly zero with constant stretches)."""
    rng = np.random.default_rng(seed)
    if family == "gauss":
        x = rng.standard_normal((rows, cols))
    elif family == "student":
        x = rng.standard_t(4, (rows, cols)) * 0.02
    elif family == "outlier":
        x = rng.standard_normal((rows, cols))
        x[:, rng.integers(0, cols, max(1, cols // 50))] *= 30.0
    elif family == "offset":
        x = 50.0 + rng.standard_normal((rows, cols)) * 0.1
    elif family == "negative":
        x = -3.0 + rng.standard_normal((rows, cols)) * 0.2
    elif family == "ties":
        x = np.round(rng.standard_normal((rows, cols)) * 3.0) / 4.0
    elif family == "zeros":
        x = np.zeros((rows, cols))
        x[:, ::5] = rng.standard_normal((rows, -(-cols // 5)))
    else:
        raise ValueError(family)
    return x.astype(np.float32)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """A folder the tests share across runs for models that are slow to make
    (e.g. SmolLM2 converted from its GGUF to a Hugging Face directory):
    $ARROWQUANT_TEST_CACHE, else ~/.cache/arrowquant-tests. Each user writes
    a complete marker last, so an interrupted build is redone."""
    import os

    root = Path(os.environ.get("ARROWQUANT_TEST_CACHE") or
                Path.home() / ".cache" / "arrowquant-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root
