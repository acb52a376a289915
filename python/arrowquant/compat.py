"""Moved to arrow_quant_v2._v1 (the first version's API lives with its import
name). This module re-exports it for one release."""

import warnings

from arrow_quant_v2._v1 import *  # noqa: F401,F403
from arrow_quant_v2._v1 import (ArrowQuantV2, AsyncArrowQuantV2, ShardedSafeTensorsLoader,  # noqa: F401
                                load_sharded_safetensors, quantize_diffusion_model)

warnings.warn("arrowquant.compat is deprecated: import from arrow_quant_v2",
              DeprecationWarning, stacklevel=2)
