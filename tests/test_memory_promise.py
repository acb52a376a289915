"""--max-memory as a promise about the process: a run's peak RSS minus its
RSS after imports stays within it (measured in a fresh process), and the
chunk sizing counts every buffer the pipeline holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq
from arrowquant.planning.plan import TensorPlan
from arrowquant.run import layout
from arrowquant.run.layout import PipelineOptions, chunk_rows, read_unit, sizing_budget
from arrowquant.sources.base import TensorInfo

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS (here pytest's).
CHILD = r"""
import json, sys
import numpy, pyarrow.parquet, arrowquant
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
arrowquant.quantize(sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[3]))
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def _model(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    tensors = {f"layers.{i}.weight": (rng.standard_normal((4096, 2048)) * 0.02).astype(np.float16)
               for i in range(2)}
    tensors["norm.weight"] = np.ones(2048, np.float16)
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("kwargs", [{"bits": 4}, {"bits": 8, "method": "rtn"},
                                    {"bits": 4, "param_dtype": "superblock", "group_size": 32,
                                     "method": "rtn"}])
def test_peak_above_imports_stays_within_max_memory(tmp_path, kwargs):
    src = _model(tmp_path)  # two 16 MiB tensors: each larger than the read units
    budget = 32
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           # the arrowquant this test imported (the source tree or the installed package)
           "PYTHONPATH": str(Path(aq.__file__).resolve().parents[1])}
    args = {**kwargs, "max_memory": f"{budget}MiB"}
    got = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out"),
                          json.dumps(args)], env=env, capture_output=True, text=True, check=True)
    m = json.loads(got.stdout.strip().splitlines()[-1])
    assert m["peak"] - m["base"] <= budget, f"{args}: {m['peak'] - m['base']:.1f} MiB above imports"


def _plan(bits=4, param_dtype="float16", fallback=(8,)):
    return TensorPlan(name="w", bits=bits, group_size=128, param_dtype=param_dtype,
                      fallback_bits=fallback)


@pytest.mark.parametrize("mib", [8, 48, 256, 1024])
@pytest.mark.parametrize("cols", [1024, 4096, 11008, 16384])
def test_chunk_sizing_counts_reads_chunks_writer_and_reserve(mib, cols):
    t = TensorInfo("w", (32000, cols), "float16", 32000 * cols * 2)
    opts = PipelineOptions(max_memory=mib << 20)
    rows = chunk_rows(t, _plan(), opts)
    out_row = max(layout._buffer_row_bytes(t, _plan(bits=b)) for b in (4, 8))
    unit_rows = max(1, read_unit(opts.max_memory) // (cols * 2))
    reads = layout.UNITS_IN_FLIGHT * min(unit_rows, t.rows) * cols * 2
    chunks = (layout.CHUNKS_IN_FLIGHT + layout.WRITER_COPIES) * rows * out_row
    reserve = opts.max_memory - sizing_budget(opts.max_memory)
    assert reads <= opts.max_memory // 4 or unit_rows == 1
    assert rows == 1 or min(reads, sizing_budget(opts.max_memory) // 2) + chunks + reserve \
        <= opts.max_memory


def test_read_unit_shrinks_with_the_budget():
    assert read_unit(256 << 20) == 16 << 20
    assert read_unit(64 << 20) == 4 << 20
    assert read_unit(1 << 20) == 64 << 10
