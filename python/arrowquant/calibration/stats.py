"""Calibration statistics, torch-free: the file format (docs/calibration-stats.md:
Parquet, one row per (layer, time_group) with count, mean, mean_sq and absmax
per input channel, the settings in the key-value metadata), its writer and
the loader that turns it into per-channel importance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..jsonfile import Opt, parse_json
from ..errors import FormatError, ModelNotFoundError, ValidationError

FORMAT_NAME = "calibration-stats"
FORMAT_VERSION = 1
META_KEY = b"arrowquant.calibration"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000

# --------------------------------------------------------------------------
# time groups


def time_group(timestep: float, num_train_timesteps: int, num_time_groups: int) -> int:
    """Group of a timestep: num_time_groups equal groups over
    [0, num_train_timesteps); t is floored, clamped into the range."""
    t = int(math.floor(float(timestep)))
    t = min(max(t, 0), num_train_timesteps - 1)
    return min(num_time_groups - 1, t * num_time_groups // num_train_timesteps)


def time_group_ranges(num_train_timesteps: int, num_time_groups: int) -> List[List[int]]:
    """[first, last] timestep (inclusive) of every group, per time_group()."""
    out = []
    for g in range(num_time_groups):
        lo = -(-g * num_train_timesteps // num_time_groups)
        hi = -(-(g + 1) * num_train_timesteps // num_time_groups) - 1
        out.append([lo, min(hi, num_train_timesteps - 1)])
    return out


def _list_array(vectors: List[np.ndarray]):
    """list<float32> from numpy vectors without a Python loop per value."""
    import pyarrow as pa

    sizes = np.array([v.size for v in vectors], dtype=np.int32)
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    flat = (np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
            if vectors else np.zeros(0, dtype=np.float32))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))


def write_stats(table: Any, out_path: Union[str, Path], meta: Dict[str, Any]) -> Path:
    """Writes the statistics table with its metadata (atomically: a temporary
    name in the same folder, renamed when complete)."""
    import os

    import pyarrow.parquet as pq

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    kv = dict(table.schema.metadata or {})
    kv[META_KEY] = json.dumps(meta).encode("utf-8")
    kv[b"arrowquant.format"] = FORMAT_NAME.encode()
    kv[b"arrowquant.format_version"] = str(FORMAT_VERSION).encode()
    table = table.replace_schema_metadata(kv)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, write_statistics=["layer", "time_group", "count"])
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# --------------------------------------------------------------------------
# loading


@dataclass
class GroupStats:
    count: int
    mean: np.ndarray
    mean_sq: np.ndarray
    absmax: np.ndarray


@dataclass
class CalibrationStats:
    """Per-layer, per-time-group activation statistics (see load_stats)."""

    groups: Dict[str, Dict[int, GroupStats]]
    num_time_groups: int
    metadata: Dict[str, Any] = field(default_factory=dict)
    module_types: Dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> List[str]:
        return sorted(self.groups)

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def resolve(self, name: str) -> Optional[str]:
        """The stats layer for a weight name: exact, else the unique layer
        whose name ends with it or that ends with it on a dot boundary
        (state dicts saved with or without a prefix such as "model.")."""
        if name in self.groups:
            return name
        hits = [k for k in self.groups if k.endswith("." + name) or name.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def _get(self, name: str) -> Dict[int, GroupStats]:
        key = self.resolve(name)
        if key is None:
            raise KeyError(f"no calibration statistics for {name!r}")
        return self.groups[key]

    def group_stats(self, name: str) -> Dict[int, GroupStats]:
        return self._get(name)

    def mean_sq(self, name: str) -> np.ndarray:
        """Pooled E[x^2] over all time groups (count-weighted)."""
        gs = self._get(name)
        total = sum(g.count for g in gs.values())
        acc = sum(g.mean_sq.astype(np.float64) * g.count for g in gs.values())
        return (acc / max(total, 1)).astype(np.float32)

    def act_absmax(self, name: str) -> np.ndarray:
        """Activation absmax per input channel over all time groups."""
        gs = self._get(name)
        return np.max(np.stack([g.absmax for g in gs.values()]), axis=0).astype(np.float32)

    def importance(self, name: str, mode: str = "max", floor: float = 1e-3) -> np.ndarray:
        """Per-input-channel importance that ignores no time group's channels.

        mode "max" (default): each group's E[x_c^2] is divided by its mean over
        channels (so every timestep group counts on the same scale, whatever
        the activation energy at that noise level), and the importance of a
        channel is its largest normalized value over the groups: a channel
        that is salient at any timestep stays salient. mode "mean": the
        pooled, count-weighted E[x_c^2] (what one group of all timesteps
        would give). Either way values are floored at `floor` times their
        mean, so that no channel's error is ignored entirely."""
        gs = self._get(name)
        if mode == "mean":
            imp = self.mean_sq(name).astype(np.float64)
        elif mode == "max":
            parts = []
            for g in gs.values():
                m = g.mean_sq.astype(np.float64)
                mu = float(m.mean())
                if mu > 0:
                    parts.append(m / mu)
            if not parts:
                return np.ones_like(next(iter(gs.values())).mean_sq, dtype=np.float32)
            imp = np.max(np.stack(parts), axis=0)
        else:
            raise ValidationError(f"importance mode must be 'max' or 'mean', got {mode!r}")
        mu = float(imp.mean())
        if mu <= 0:
            return np.ones_like(imp, dtype=np.float32)
        return np.maximum(imp, floor * mu).astype(np.float32)

    def activation_stats_json(self, name: str) -> str:
        """Compact summary for the activation_stats_json column."""
        gs = self._get(name)
        imp = self.importance(name)
        absmax = self.act_absmax(name)
        msq = self.mean_sq(name)
        top = np.argsort(-imp, kind="stable")[:8]
        doc = {
            "source": "calibration",
            "layer": self.resolve(name),
            "channels": int(imp.size),
            "count": int(sum(g.count for g in gs.values())),
            "time_groups": sorted(int(k) for k in gs),
            "absmax_max": float(absmax.max()),
            "mean_sq_mean": float(msq.mean()),
            "importance": "max over time groups of group-normalized mean_sq",
            "importance_max_over_median": float(imp.max() / max(float(np.median(imp)), 1e-30)),
            "top_channels": [int(i) for i in top],
        }
        return json.dumps(doc, separators=(",", ":"))

    def time_aware_json(self, name: str) -> str:
        """Time-aware settings for the time_aware_quant_json column."""
        gs = self._get(name)
        keys = sorted(gs)
        doc = {
            "num_time_groups": self.num_time_groups,
            "num_train_timesteps": self.metadata.get("num_train_timesteps"),
            "time_group_ranges": self.metadata.get("time_group_ranges"),
            "groups_seen": keys,
            "group_counts": [int(gs[k].count) for k in keys],
            "group_mean_sq": [float(gs[k].mean_sq.mean()) for k in keys],
            "group_absmax": [float(gs[k].absmax.max()) for k in keys],
            "combine": "max over time groups of mean_sq / mean_c(mean_sq)",
        }
        return json.dumps(doc, separators=(",", ":"))


def load_stats(path: Union[str, Path]) -> CalibrationStats:
    """Reads a statistics file written by calibrate()."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"calibration statistics {str(p)!r} do not exist")
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several classes for a bad file
        raise FormatError(f"{p}: not a Parquet statistics file ({exc})") from None
    kv = table.schema.metadata or {}
    if META_KEY not in kv:
        raise FormatError(f"{p}: no {META_KEY.decode()} metadata; not written by arrowquant "
                          "calibrate")
    meta = parse_json(kv[META_KEY], f"{p} ({META_KEY.decode()} metadata)",
                      {"num_time_groups": Opt(int), "model": Opt(str)})
    need = {"layer", "time_group", "count", "mean", "mean_sq", "absmax"}
    missing = need - set(table.column_names)
    if missing:
        raise FormatError(f"{p}: missing columns {sorted(missing)}")
    groups: Dict[str, Dict[int, GroupStats]] = {}
    types: Dict[str, str] = {}
    cols = {c: table.column(c) for c in need}
    layer = cols["layer"].to_pylist()
    tg = cols["time_group"].to_pylist()
    cnt = cols["count"].to_pylist()
    mt = table.column("module_type").to_pylist() if "module_type" in table.column_names else None
    for i in range(table.num_rows):
        if not isinstance(layer[i], str) or not isinstance(tg[i], int) or \
                not isinstance(cnt[i], int) or any(not cols[c][i].is_valid
                                                   for c in ("mean", "mean_sq", "absmax")):
            raise FormatError(f"{p}: row {i}: layer, time_group, count, mean, mean_sq and absmax "
                              "must all be set (layer a string, the others integers / lists)")
        try:
            vals = [np.asarray(cols[c][i].values.to_numpy(zero_copy_only=False), dtype=np.float32)
                    for c in ("mean", "mean_sq", "absmax")]
        except (AttributeError, TypeError, ValueError) as exc:
            raise FormatError(f"{p}: row {i} ({layer[i]!r}): mean, mean_sq and absmax must be "
                              f"lists of numbers ({exc})") from None
        if not (vals[0].size == vals[1].size == vals[2].size):
            raise FormatError(f"{p}: row {i} ({layer[i]!r}): mean, mean_sq and absmax lengths "
                              "differ")
        groups.setdefault(layer[i], {})[int(tg[i])] = GroupStats(int(cnt[i]), *vals)
        if mt is not None:
            types[layer[i]] = mt[i]
    return CalibrationStats(groups=groups, num_time_groups=int(meta.get("num_time_groups") or 1),
                            metadata=meta, module_types=types)
