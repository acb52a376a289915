"""Golden outputs: small models quantized by the CLI with fixed settings.

`python tests/golden/cases.py write` (from the repository root, with the
package importable) rewrites tests/golden/data/ from the current code;
tests/test_golden.py checks that the current code still writes the same
bytes. The data committed was written by the code before the package was
reorganized (issue 13), so the test holds the refactor to byte-identical
outputs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

#: case name -> (input kind, CLI arguments after "quantize IN OUT")
#: The defaults before issue 18 (mse, float16 parameters, groups of 128),
#: pinned: the golden data was written with them, and the cases hold the
#: algorithms to byte-identical output whatever the defaults are.
OLD = ["--method", "mse", "--param-dtype", "float16", "--group-size", "128"]
#: case name -> (input kind, CLI arguments after "quantize IN OUT")
CASES: Dict[str, Tuple[str, List[str]]] = {
    "int4-default": ("v1", OLD),
    "int2-default": ("v1", ["--bits", "2", *OLD]),
    "int8-default": ("v1", ["--bits", "8", *OLD]),
    "int4-rtn-f32": ("v1", ["--method", "rtn", "--param-dtype", "float32", "--group-size", "128"]),
    "int4-symmetric": ("v1", ["--scheme", "symmetric", "--group-size", "64", "--method", "mse",
                              "--param-dtype", "float16"]),
    "int4-superblock-g32": ("v1", ["--param-dtype", "superblock", "--group-size", "32",
                                   "--method", "mse"]),
    "int2-superblock-rtn": ("v1", ["--bits", "2", "--param-dtype", "superblock",
                                   "--group-size", "16", "--method", "rtn"]),
    "int8-superblock": ("v1", ["--bits", "8", "--param-dtype", "superblock",
                               "--group-size", "64", "--method", "mse"]),
    "int4-1d": ("v1", ["--quantize-1d", "--group-size", "32", "--method", "mse",
                       "--param-dtype", "float16"]),
    "chunks-shards": ("st", ["--chunk-size", "4KiB", "--shard-size", "16KiB", *OLD]),
    "target-bpw": ("st", ["--target-bpw", "3.5", *OLD]),
    "rules": ("st", ["--keep", "*embed*", "--bits-for", "*mlp*=8", "--skip-sensitive", *OLD]),
    "pipeline": ("pipe", ["--bits", "4", *OLD]),
}
#: case name -> export-gguf arguments
GGUF_CASES: Dict[str, List[str]] = {
    "gguf-q8": ["--bits", "8"],
    "gguf-q4_0": ["--bits", "4"],
    "gguf-q4_1": ["--bits", "4", "--scheme", "asymmetric"],
}

#: Fields that hold times or absolute paths: they differ between any two runs.
VOLATILE = ("seconds", "output", "source", "path", "stats_path", "files")


def tensors(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": (rng.standard_normal((96, 64)) * 0.02).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float16),
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((80, 64)) * 0.05).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_t(4, (64, 80)) * 0.05).astype(np.float16),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(np.float16),
        "model.layers.0.conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float16),
        "time_embedding.linear_1.weight": (rng.standard_normal((64, 32)) * 0.1).astype(np.float32),
        "lm_head.weight": (rng.standard_normal((96, 64)) * 0.02).astype(np.float16),
    }


def make_input(kind: str, root: Path) -> Path:
    """The input model of a case, written deterministically under root."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    ts = tensors()
    if kind == "v1":
        d = root / "v1"
        d.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("layer_name", pa.string()), ("shape", pa.list_(pa.int64())),
                            ("dtype", pa.string()), ("data", pa.large_binary()),
                            ("num_params", pa.int64())])
        rows = [{"layer_name": n, "shape": list(a.shape), "dtype": a.dtype.name,
                 "data": a.tobytes(), "num_params": int(a.size)} for n, a in ts.items()]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / "model.parquet",
                       row_group_size=1)
        (d / "metadata.json").write_text(json.dumps({"modality": "text"}))
        return d
    if kind == "st":
        d = root / "st"
        d.mkdir(parents=True, exist_ok=True)
        save_file(ts, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return d
    if kind == "pipe":
        d = root / "pipe"
        for comp, names in (("unet", ["time_embedding.linear_1.weight",
                                      "model.layers.0.conv.weight",
                                      "model.layers.0.self_attn.q_proj.weight"]),
                            ("text_encoder", ["model.embed_tokens.weight",
                                              "model.layers.0.mlp.up_proj.weight"])):
            (d / comp).mkdir(parents=True, exist_ok=True)
            save_file({n: ts[n] for n in names}, str(d / comp / "model.safetensors"))
            (d / comp / "config.json").write_text(json.dumps({"_class_name": comp}))
        (d / "scheduler").mkdir(parents=True, exist_ok=True)
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"steps": 10}))
        (d / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"]}))
        return d
    raise ValueError(kind)


def scrub(value: Any) -> Any:
    """A JSON value without its volatile fields (times, absolute paths)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def run_case(name: str, root: Path) -> Path:
    """Runs one case into root/out/<name> and returns that path."""
    from arrowquant.cli import main

    out = root / "out" / name
    if name in GGUF_CASES:
        src = make_input("v1", root)
        out.mkdir(parents=True, exist_ok=True)
        code = main(["export-gguf", str(src), str(out / "model.gguf"), "--no-progress",
                     *GGUF_CASES[name]])
    else:
        kind, args = CASES[name]
        src = make_input(kind, root)
        code = main(["quantize", str(src), str(out), "--no-progress", *args])
    if code != 0:
        raise RuntimeError(f"golden case {name}: exit {code}")
    return out


def snapshot(out: Path) -> Dict[str, bytes]:
    """relative path -> bytes (JSON files scrubbed and re-serialized)."""
    files: Dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        data = p.read_bytes()
        if p.suffix == ".json":
            data = json.dumps(scrub(json.loads(data)), indent=1, sort_keys=True).encode()
        files[rel] = data
    return files


def write_all() -> None:
    import tempfile

    shutil.rmtree(DATA, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [*CASES, *GGUF_CASES]:
            out = run_case(name, Path(tmp))
            for rel, data in snapshot(out).items():
                dst = DATA / name / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:] != ["write"]:
        sys.exit("usage: python tests/golden/cases.py write")
    write_all()
