"""Running a quantize Job: runner.py (one model, or the components of a
diffusers pipeline), streaming.py (read -> quantize -> write overlapped),
layout.py (chunks and the memory budget), prefetch.py, staging.py (locks,
parts, resume), report.py (records, summaries)."""
