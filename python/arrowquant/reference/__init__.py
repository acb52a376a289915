"""The quantization math of FORMAT.md in plain numpy: the engine's bit-exact
twin. The tests' oracle, the benchmarks' baseline and `--engine reference`;
production code never imports it otherwise.

- rtn.py: FORMAT.md sections 1-3 (rtn parameters, codes, packing)
- search.py: the `mse` search and float16 parameters (docs/FORMAT.md 7)
- superblock.py: two-level parameters (docs/FORMAT.md 9.6)
- importance.py: the importance-weighted search
"""

from __future__ import annotations

from ..engine.dtypes import to_float32
from .rtn import (choose_params, dequantize_array, dequantize_codes, encode, pack, quantize_array,
                  rtn_params, unpack)

__all__ = ["quantize_array", "dequantize_array", "choose_params", "rtn_params", "encode", "pack",
           "unpack", "dequantize_codes", "to_float32"]
