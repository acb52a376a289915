"""The one wording of a non-finite weight: "tensor 'w': NaN at index I (row R,
column C) in FILE", the index counted in the whole tensor. The C++ engine
words it the same way (kernels::NonFiniteAt); the numpy paths (reference,
planner samples, weighted search) call check_finite."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ValidationError


def nonfinite_message(value: float, index: int, cols: int) -> str:
    """ "NaN at index I (row R, column C)" for element `index` of a tensor
    whose rows have `cols` elements."""
    row, col = (index // cols, index % cols) if cols > 0 else (0, index)
    kind = "NaN" if np.isnan(value) else "Inf"
    return f"{kind} at index {index} (row {row}, column {col})"


def with_location(message: str, location: Optional[str]) -> str:
    return f"{message} in {location}" if location else message


def check_finite(x: np.ndarray, *, name: str, cols: int, first_row: int = 0,
                 location: Optional[str] = None) -> None:
    """ValidationError naming the first NaN / Inf of `x` (rows of `cols`
    values starting at row `first_row` of tensor `name`), or nothing."""
    flat = np.asarray(x).reshape(-1)
    bad = ~np.isfinite(flat)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    message = nonfinite_message(float(flat[i]), first_row * cols + i, cols)
    raise ValidationError(with_location(f"tensor {name!r}: {message}", location))
