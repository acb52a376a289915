"""Moved to arrowquant.formats.v2_schema, formats.v2_writer, formats.v2_reader and formats.arrow_checks.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .formats.v2_schema import *  # noqa: F401,F403
from .formats.v2_writer import record_batch, open_writer, write_row  # noqa: F401
from .formats.v2_reader import *  # noqa: F401,F403
from .formats.v2_reader import _row_bytes, V2_COLUMNS, OPTIONAL_COLUMNS, QUANT_TYPES  # noqa: F401
from .formats.v2_checks import *  # noqa: F401,F403
from .formats.v2_checks import check_coverage as _check_coverage, equalization_scales as _equalization_scales  # noqa: F401
from .formats.arrow_checks import check_schema, check_shape, data_column_bytes, check_row_group_holds, MAX_NUMEL, MAX_RANK, blob_view as _blob_view, list_values as _list_values, is_int as _is_int, is_str as _is_str, is_int_list as _is_int_list, is_param_list as _is_param_list, is_blob as _is_blob  # noqa: F401
from .engine.superblock import pack_codes, unpack_codes, superblock_params  # noqa: F401
from .engine.dtypes import NATIVE_DTYPES, readback_dtype  # noqa: F401
from .spec import param_code_bytes  # noqa: F401

warnings.warn("arrowquant.parquet_v2 is deprecated: import from arrowquant.formats.v2_schema",
              DeprecationWarning, stacklevel=2)
