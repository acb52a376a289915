"""Calibration across diffusion timesteps: per-input-channel activation
statistics of every Linear and Conv2d layer, recorded separately for each
group of timesteps (record.py, needs torch), and the torch-free statistics
file the quantizer reads (stats.py).

torch, diffusers and transformers are optional extras, imported only when
`calibrate` runs; `load_stats` needs only pyarrow and numpy.
"""

from __future__ import annotations

from .inputs import DEFAULT_SENTENCES, CalibrationInput, read_calibration_inputs
from .record import StatsRecorder, calibrate
from .stats import (DEFAULT_NUM_TRAIN_TIMESTEPS, FORMAT_NAME, FORMAT_VERSION, META_KEY,
                    CalibrationStats, GroupStats, load_stats, time_group, time_group_ranges,
                    write_stats)

__all__ = ["calibrate", "load_stats", "write_stats", "CalibrationStats", "GroupStats",
           "StatsRecorder", "CalibrationInput", "read_calibration_inputs", "time_group",
           "time_group_ranges", "DEFAULT_SENTENCES", "DEFAULT_NUM_TRAIN_TIMESTEPS"]
