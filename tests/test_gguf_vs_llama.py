"""ArrowQuant's block search against llama.cpp's own quantizer (its libggml
from llama-cpp-python, called through ctypes as benches/gguf_quality_benchmark.py
does): same matrices, same type, lower error, with and without importance
weights (llama.cpp getting them as its imatrix). Skipped without
llama-cpp-python (requirements-llama.txt)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.llama_cpp

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

from gguf_quality_benchmark import (TYPES, LlamaQuantizer, db, errors, find_ggml,  # noqa: E402
                                    synthetic_family)

from arrowquant.engine import gguf_blocks as gb  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    lib = find_ggml(None)
    if lib is None:
        pytest.skip("libggml-base not found in llama_cpp")
    return LlamaQuantizer(lib)


@pytest.mark.parametrize("family", ["gaussian", "student_t4", "outlier_columns"])
def test_lower_error_than_llama_cpp_at_every_type(llama, family):
    (_, x, imp), = synthetic_family(family, 64, 2048)
    for t in TYPES:
        for w in (None, imp):
            q, _ = gb.quantize_blocks(t, x, importance=w)
            ours = db(*errors(x, gb.dequantize_blocks(t, q, *x.shape), w))
            ql = llama.quantize(t, x, w)
            assert q.shape == ql.shape, t  # the same type: the same bytes per row
            theirs = db(*errors(x, llama.decode(t, ql, x.shape), w))
            assert ours > theirs, (family, t, w is not None, ours, theirs)
