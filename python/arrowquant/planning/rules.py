"""Per-layer rules of the planners: user patterns (--keep, --bits-for) and
the built-in lists of timestep / modulation layers (kept at INT8 or wider) and
of sensitive layers (kept under --skip-sensitive).

Patterns: shell-style (fnmatch, case-sensitive, matched against the whole
tensor name: "*.attn1.*") or "re:REGEX" (re.search anywhere in the name:
"re:to_[qkv]"). The built-in lists are regexes, case-insensitive.
"""

from __future__ import annotations

import fnmatch
import re
from typing import List, Optional, Tuple

WIDTHS = (2, 4, 8)

#: Layers that compute or apply the timestep embedding / adaptive-norm
#: modulation: errors here shift every activation at every step, so they
#: stay at INT8 or better. (label, regex), case-insensitive.
TIMESTEP_PATTERNS: List[Tuple[str, str]] = [
    ("time embedding", r"time_?embed"),
    ("time embedding projection", r"time_emb_proj"),
    ("timestep embedder", r"(?:^|[._])t(?:imestep)?_embedder"),
    ("time-text embedding", r"time_text_embed"),
    ("adaLN modulation", r"adaln"),
    ("adaptive-norm modulation", r"(?:^|[._])norm\d*(?:_context|_out)?\.linear"),
    ("adaptive-norm conditioning embedding", r"(?:^|[._])norm\d*\.emb\."),
    ("modulation", r"modulation|_mod\.lin"),
    ("emb_layers", r"emb_layers"),
    ("scale-shift table", r"scale_shift_table"),
    ("DiT output modulation", r"^proj_out_1\."),
    ("added conditioning embedding", r"add_embedding|class_embedding|label_emb"),
]

#: Kept unquantized under skip_sensitive_layers. (label, regex), case-insensitive.
SENSITIVE_PATTERNS: List[Tuple[str, str]] = [
    ("embedding", r"embed|(?:^|\.)(?:wte|wpe)\."),
    ("norm", r"norm|(?:^|\.)ln_?(?:f|\d+)?\."),
    ("output head", r"(?:^|\.)(?:lm_head|classifier|score|head)\.|^(?:conv_out|proj_out(?:_\d)?|norm_out)\."),
]

_TIMESTEP_RX = [(label, re.compile(rx, re.IGNORECASE)) for label, rx in TIMESTEP_PATTERNS]
_SENSITIVE_RX = [(label, re.compile(rx, re.IGNORECASE)) for label, rx in SENSITIVE_PATTERNS]


def match_pattern(pattern: str, name: str) -> bool:
    """fnmatch on the whole name, or re.search for "re:REGEX"."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def timestep_layer(name: str) -> Optional[str]:
    """The label of the timestep / modulation pattern `name` matches, or None."""
    for label, rx in _TIMESTEP_RX:
        if rx.search(name):
            return label
    return None


def sensitive_layer(name: str) -> Optional[str]:
    for label, rx in _SENSITIVE_RX:
        if rx.search(name):
            return label
    return None
