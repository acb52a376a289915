"""Moved to arrowquant.run (layout, staging, streaming, prefetch, report) and formats.v2_writer.

This module re-exports the old names for one release; import them from the
new place."""

import warnings

from .run.layout import READ_UNIT, PipelineOptions, Chunk, output_row_bytes, chunk_rows, plan_chunks, check_memory_budget  # noqa: F401
from .run.staging import STAGING, LOCK_NAME, OutputLock, PART_MAGIC, part_name, write_part, read_part, read_part_info  # noqa: F401
from .run.report import TensorRecord  # noqa: F401
from .run.prefetch import Prefetcher  # noqa: F401
from .run.buffers import lean_allocators  # noqa: F401
from .run.layout import TensorLayout  # noqa: F401
from .run.streaming import StreamingQuantizer, WriteItem  # noqa: F401
from .formats.v2_writer import ShardWriter  # noqa: F401
from .engine.chunk import ChunkQuantizer  # noqa: F401
from .files import atomic_write_text as _atomic_write_text, io_error as _io_error  # noqa: F401

warnings.warn("arrowquant.pipeline is deprecated: import from arrowquant.run",
              DeprecationWarning, stacklevel=2)
