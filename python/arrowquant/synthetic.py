"""Seeded synthetic transformer models for demos, tests and benchmarks.

A size class names a Llama-shaped architecture whose parameter count is
within 5% of its nominal size (tests assert it). `generate_model` writes the
model as Parquet V1 (FORMAT.md section 4) or as one SafeTensors file, in
bounded memory: weights are drawn in row blocks from a per-tensor seeded RNG,
so no more than one tensor (Parquet needs each tensor as a single cell) or one
row block (SafeTensors) is in memory at a time. Results are cached: a
manifest written last marks a complete model, and a matching one is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import numpy as np

from .files import pid_alive

GENERATOR_VERSION = 1
MANIFEST_NAME = ".synthetic_manifest.json"

#: Standard deviation of linear and embedding weights (the usual init scale).
WEIGHT_STD = 0.02
#: Fraction of input columns of each matrix that carry outliers, and their gain.
OUTLIER_FRACTION = 0.005
OUTLIER_GAIN = 8.0
#: Elements per generated row block (float32 scratch: 16 MiB).
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SizeClass:
    name: str
    nominal_params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int


SIZE_CLASSES: Dict[str, SizeClass] = {
    # 9.87M parameters: tiny, for CI and the demo.
    "10M": SizeClass("10M", 10_000_000, hidden=256, layers=4, intermediate=1536, vocab=8000),
    # 100.3M parameters.
    "100M": SizeClass("100M", 100_000_000, hidden=768, layers=12, intermediate=2048, vocab=10000),
    # 600.4M parameters.
    "600M": SizeClass("600M", 600_000_000, hidden=1024, layers=24, intermediate=5888, vocab=32000),
    # 6.74B parameters: the Llama-2-7B shapes.
    "7B": SizeClass("7B", 7_000_000_000, hidden=4096, layers=32, intermediate=11008, vocab=32000),
}

_DTYPES = {
    # name: (safetensors code, itemsize)
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float32": ("F32", 4),
}
_FORMATS = ("parquet", "safetensors")
_MODALITIES = ("text", "code", "image", "audio")


def size_class(size: str) -> SizeClass:
    """The SizeClass for `size` ("10M", "100m", ...), or ValueError."""
    for key, value in SIZE_CLASSES.items():
        if key.lower() == str(size).strip().lower():
            return value
    raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZE_CLASSES)}")


def model_spec(size: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor, named like a Llama state dict, in file order."""
    sc = size_class(size)
    h, i, v = sc.hidden, sc.intermediate, sc.vocab
    spec: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(sc.layers):
        p = f"model.layers.{layer}"
        spec += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (h, h)),
            (f"{p}.self_attn.v_proj.weight", (h, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    spec += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return spec


def count_params(size: str) -> int:
    """Exact parameter count of the size class."""
    return sum(int(np.prod(shape)) for _, shape in model_spec(size))


def model_bytes(size: str, dtype: str = "float16") -> int:
    """Bytes of weight data (without container overhead)."""
    return count_params(size) * _dtype_info(dtype)[1]


def _dtype_info(dtype: str) -> Tuple[str, int]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    # Derived from the name, so a tensor's values do not depend on the others.
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])


def _cast(block: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return block.astype(np.float16)
    if dtype == "bfloat16":
        import ml_dtypes

        return block.astype(ml_dtypes.bfloat16)
    return block


def tensor_blocks(name: str, shape: Tuple[int, ...], seed: int,
                  dtype: str = "float16") -> Iterator[np.ndarray]:
    """The tensor's values in row blocks (2-D, cast to `dtype`), deterministic for (seed, name).

    Norm weights are 1 + N(0, 0.02); matrices are N(0, 0.02) with a few
    outlier input columns scaled by OUTLIER_GAIN, as trained LLM weights show.
    """
    rng = np.random.Generator(np.random.PCG64(_tensor_seed(seed, name)))
    if len(shape) == 1:
        block = 1.0 + WEIGHT_STD * rng.standard_normal(shape[0], dtype=np.float32)
        yield _cast(block.reshape(1, -1), dtype)
        return
    rows, cols = shape[0], int(np.prod(shape[1:]))
    n_out = max(1, int(round(cols * OUTLIER_FRACTION)))
    outlier_cols = np.sort(rng.choice(cols, size=n_out, replace=False))
    step = max(1, BLOCK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n, cols), dtype=np.float32)
        block *= np.float32(WEIGHT_STD)
        block[:, outlier_cols] *= np.float32(OUTLIER_GAIN)
        yield _cast(block, dtype)


def _manifest(sc: SizeClass, fmt: str, seed: int, dtype: str, modality: str) -> dict:
    return {
        "generator": "arrowquant.synthetic",
        "generator_version": GENERATOR_VERSION,
        "size_class": sc.name,
        "format": fmt,
        "seed": int(seed),
        "dtype": dtype,
        "modality": modality,
        "params": count_params(sc.name),
        "architecture": asdict(sc),
    }


def _metadata(manifest: dict) -> dict:
    meta = {"modality": manifest["modality"], "source": "arrowquant synthetic model"}
    meta.update({k: manifest[k] for k in ("size_class", "params", "seed", "dtype",
                                          "generator_version", "architecture")})
    return meta


def read_manifest(model_dir: Union[str, Path]) -> Union[dict, None]:
    """The manifest of a complete generated model, or None."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def generate_model(out_dir: Union[str, Path], size: str = "10M", fmt: str = "parquet",
                   seed: int = 0, dtype: str = "float16", modality: str = "text") -> Path:
    """Write a synthetic model into directory `out_dir` and return it.

    Parquet: `model.parquet` (one row group per tensor) + `metadata.json`.
    SafeTensors: `model.safetensors` + `metadata.json`.
    Skips all work when `out_dir` already holds a complete model with the same
    parameters; otherwise builds it in a temporary sibling directory and renames
    it into place, so an interrupted run never leaves a model that looks done.
    """
    sc = size_class(size)
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be 'parquet' or 'safetensors', got {fmt!r}")
    _dtype_info(dtype)
    if modality not in _MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(_MODALITIES)}, got {modality!r}")
    out = Path(out_dir)
    manifest = _manifest(sc, fmt, seed, dtype, modality)
    if out.exists():
        existing = read_manifest(out)
        if existing == manifest:
            return out
        if existing is None and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a synthetic model written by arrowquant; "
                "choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if fmt == "parquet":
            _write_parquet(tmp / "model.parquet", sc.name, seed, dtype)
        else:
            _write_safetensors(tmp / "model.safetensors", sc.name, seed, dtype, modality)
        (tmp / "metadata.json").write_text(json.dumps(_metadata(manifest), indent=2) + "\n")
        _fsync_dir_files(tmp)
        publish_model_dir(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def publish_model_dir(tmp: Path, out: Path, manifest: Dict) -> None:
    """Writes the manifest into the finished folder `tmp` (last: its presence
    means the model is complete) and puts `tmp` in the place of `out`."""
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash)
    else:
        tmp.rename(out)


def _remove_stale_temps(out: Path) -> None:
    """Removes the temporary directories of earlier runs that were killed (a
    SIGKILL or SIGTERM leaves no chance to clean up); a live writer's is kept."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and not pid_alive(int(suffix)):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _write_parquet(path: Path, size: str, seed: int, dtype: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("layer_name", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("data", pa.large_binary()),
        ("num_params", pa.int64()),
    ])
    itemsize = _dtype_info(dtype)[1]
    # Random float16 mantissas do not compress; statistics on multi-MB binary
    # cells only bloat the footer, so both are off for `data`.
    with pq.ParquetWriter(str(path), schema, compression="NONE", use_dictionary=False,
                          write_statistics=["layer_name", "dtype", "num_params"]) as writer:
        for name, shape in model_spec(size):
            numel = int(np.prod(shape))
            buf = np.empty(numel * itemsize, dtype=np.uint8)
            pos = 0
            for block in tensor_blocks(name, shape, seed, dtype):
                raw = block.reshape(-1).view(np.uint8)
                buf[pos:pos + raw.size] = raw
                pos += raw.size
            offsets = np.array([0, buf.size], dtype=np.int64)
            # Zero-copy: the Arrow cell points at the numpy buffer.
            data = pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(buf)])
            table = pa.Table.from_arrays([
                pa.array([name], pa.string()),
                pa.array([list(shape)], pa.list_(pa.int64())),
                pa.array([dtype], pa.string()),
                data,
                pa.array([numel], pa.int64()),
            ], schema=schema)
            writer.write_table(table, row_group_size=1)
            del table, data, buf


def _write_safetensors(path: Path, size: str, seed: int, dtype: str, modality: str) -> None:
    code, itemsize = _dtype_info(dtype)
    spec = model_spec(size)
    header: Dict[str, object] = {
        "__metadata__": {"format": "pt", "modality": modality, "size_class": size,
                         "seed": str(seed), "generator": "arrowquant.synthetic"},
    }
    offset = 0
    for name, shape in spec:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in spec:
            for block in tensor_blocks(name, shape, seed, dtype):
                f.write(np.ascontiguousarray(block).view(np.uint8).data)
        f.flush()
