"""Progress of long work: a (message, fraction) callback from what the caller
gave: a tqdm bar on a terminal, the user's callable, or nothing."""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional, Union

ProgressArg = Union[None, bool, Callable[[str, float], Any]]
ProgressFn = Callable[[str, float], None]


def progress_fn(progress: ProgressArg, total_bytes: int) -> Optional[Callable[[str, float], None]]:
    """A (message, fraction) callback: tqdm on a terminal, the user's callable,
    or nothing. Exceptions raised by a user callback are reported, not fatal."""
    if progress is False:
        return None
    if callable(progress):
        user = progress

        def call(message: str, fraction: float) -> None:
            try:
                user(message, fraction)
            except Exception as exc:  # a broken callback must not kill an hour-long run
                warnings.warn(f"progress callback raised {type(exc).__name__}: {exc}", RuntimeWarning)

        return call
    if progress is None and not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="quantize", dynamic_ncols=True, file=sys.stderr)

    def update(message: str, fraction: float) -> None:
        target = int(fraction * total_bytes)
        bar.update(max(0, target - bar.n))
        bar.set_postfix_str(message[:60], refresh=False)
        if fraction >= 1.0:
            bar.close()

    return update
