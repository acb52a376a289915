"""The door to the C++ engine (arrowquant._core): the only module of the
package that imports it. Everything else calls the engine through
arrowquant.engine (array API, chunk quantizer, weighted search) or through the
file codecs re-exported here (SafeTensors reader, GGUF writer / reader)."""

from __future__ import annotations

from typing import Any, Callable

from .. import _core
from ..errors import ArrowQuantError

# File codecs: the strict SafeTensors header parser and pread reader, the
# streaming GGUF writer, its block codecs and its validating reader.
SafeTensorsFile = _core.SafeTensorsFile
parse_safetensors_header = _core.parse_safetensors_header
parse_safetensors_buffer = _core.parse_safetensors_buffer
GgufWriter = _core.GgufWriter
gguf_read_file = _core.gguf_read_file
gguf_parse = _core.gguf_parse
gguf_file_type = _core.gguf_file_type
gguf_quantize_blocks = _core.gguf_quantize_blocks
gguf_dequantize_blocks = _core.gguf_dequantize_blocks
gguf_block_types = _core.gguf_block_types
gguf_row_bytes = _core.gguf_row_bytes
gguf_blocks_quantize = _core.gguf_blocks_quantize
gguf_blocks_dequantize = _core.gguf_blocks_dequantize
gguf_blocks_kernel = _core.gguf_blocks_kernel
gguf_parse_file_type = _core.gguf_parse_file_type

# The runtime's matmul on packed weights (arrowquant.runtime.ops).
quant_matmul = _core.quant_matmul
dequantize_matrix_rows = _core.dequantize_matrix_rows
dequantize_matrix_gather = _core.dequantize_matrix_gather
active_matmul_kernel = _core.active_matmul_kernel

# Kernels (buffers are allocated by the callers in arrowquant.engine).
quantize = _core.quantize
quantize_superblock = _core.quantize_superblock
quantize_with_params = _core.quantize_with_params
dequantize = _core.dequantize
quantize_importance = _core.quantize_importance
importance_params = _core.importance_params
# Code grids (docs/FORMAT.md section 10; arrowquant.engine.grid).
grid_learn_levels = _core.grid_learn_levels
grid_quantize = _core.grid_quantize
grid_quantize_superblock = _core.grid_quantize_superblock
grid_dequantize = _core.grid_dequantize
# Jumps between adjacent groups' parameters (engine.metrics.markov_of_params).
markov_jumps = _core.markov_jumps
# The superblock param_codes stream into a caller buffer (run/streaming.py).
pack_param_codes = _core.pack_param_codes


def call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Calls the engine; prefixes its error message with the tensor name
    (same exception class)."""
    try:
        return fn(*args)
    except ArrowQuantError as exc:
        raise type(exc)(f"tensor {name!r}: {exc}") from None


def active_kernel() -> str:
    """The SIMD path the engine uses on this CPU ("avx2" or "scalar")."""
    return _core.active_kernel()


def fix_mmap_threshold() -> bool:
    """Large allocations always mmapped, so freed buffers return to the system."""
    return _core.fix_mmap_threshold()
