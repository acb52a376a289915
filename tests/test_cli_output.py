"""The CLI's stdout when its reader goes away: `arrowquant inspect M | head`
under `set -o pipefail` (the README's quick start) must not fail."""

from __future__ import annotations

import os
import sys

import arrowquant as aq
from arrowquant import cli
from conftest import small_tensors, write_v1


def test_broken_pipe_on_stdout_is_not_an_error(tmp_path, monkeypatch):
    src = tmp_path / "m"
    write_v1(src, small_tensors())
    aq.quantize(str(src), str(tmp_path / "q"), progress=False)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write fails with EPIPE
    fake_stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", fake_stdout)
    try:
        assert cli.main(["inspect", str(tmp_path / "q")]) == 0
    finally:
        monkeypatch.undo()
        try:
            fake_stdout.close()  # its fd now points at /dev/null: a quiet close
        except OSError:
            pass
