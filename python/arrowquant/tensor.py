"""Moved to arrowquant.engine.tensor, engine.metrics, engine.dtypes, engine.superblock and spec.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .spec import *  # noqa: F401,F403
from .spec import check_spec, view_2d, View2D, groups_per_row, packed_row_bytes, superblock_groups, superblock_code_bits, superblocks_per_row, param_code_bytes, VALID_BITS, VALID_SCHEMES, VALID_METHODS, VALID_PARAM_DTYPES, SUPERBLOCK_WEIGHTS  # noqa: F401
from .engine.dtypes import QUANTIZABLE_DTYPES, canonical_dtype  # noqa: F401
from .engine.metrics import ErrorMetrics, ErrorSums  # noqa: F401
from .engine.tensor import QuantizedTensor, SourceTensor, as_source  # noqa: F401
from .engine.superblock import pack_param_codes, unpack_param_codes, expand_superblock, superblock_codes, _units_per_group  # noqa: F401

warnings.warn("arrowquant.tensor is deprecated: import from arrowquant.engine.tensor",
              DeprecationWarning, stacklevel=2)
