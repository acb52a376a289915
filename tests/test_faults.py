"""Faults during a run: SIGKILL at random points, disk full, inputs changing
under the reader. The output is never mistaken for a finished model, and
--resume completes it to the same bytes as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import arrowquant as aq
from arrowquant.errors import FormatError
from conftest import write_v1

# Through the command line, as a user runs it (issue 12: a resume that only
# worked through the Python API went unnoticed): `arrowquant quantize SRC OUT
# --bits 4 --group-size 64 --chunk-size 64KiB [--resume]`.
QUANTIZE = ("import sys; from arrowquant.cli import main; sys.exit(main(['quantize', sys.argv[1], "
            "sys.argv[2], '--bits', '4', '--group-size', '64', '--chunk-size', '64KiB', "
            "'--no-progress'] + (['--resume'] if len(sys.argv) > 3 else [])))")


def model_with_many_chunks(root: Path) -> Path:
    rng = np.random.default_rng(5)
    tensors = {f"layers.{i}.weight": rng.standard_normal((512, 512)).astype(np.float16)
               for i in range(12)}
    tensors["norm.weight"] = np.ones(512, np.float16)
    return write_v1(root, tensors)


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.suffix == ".parquet" or p.name.endswith(".index.json")}


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", QUANTIZE, *args], capture_output=True, text=True,
                          **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = model_with_many_chunks(root / "src")
    full = root / "full"
    t0 = time.perf_counter()
    r = run(str(src), str(full))
    assert r.returncode == 0, r.stderr
    return src, digest(full), time.perf_counter() - t0


def test_sigkill_at_random_points_then_resume_is_byte_identical(reference_run, tmp_path):
    src, expect, duration = reference_run
    rng = random.Random(1234)
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", QUANTIZE, str(src), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, max(0.4, duration * 0.9)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = (out / "metadata.json").exists()
        staged = len(list((out / ".arrowquant-staging").glob("*.part")))
        print(f"attempt {attempt}: finished before the kill: {finished}, staged parts: {staged}")
        if not finished:
            # Whatever is there must not look like a finished model.
            assert not (out / "model.parquet").exists() or (out / ".arrowquant-staging").exists()
        r = run(str(src), str(out), "resume")
        assert r.returncode == 0, r.stderr
        assert digest(out) == expect
        assert (out / "metadata.json").exists()
        assert not (out / ".arrowquant-staging").exists()


def test_disk_full_is_a_clear_error_and_resumable(reference_run, tmp_path):
    src, expect, _ = reference_run
    before = hashlib.sha256((src / "model.parquet").read_bytes()).hexdigest()
    out = tmp_path / "out"
    limited = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); " + QUANTIZE)
    r = subprocess.run([sys.executable, "-c", limited, str(src), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and "--resume" in r.stderr
    assert not (out / "metadata.json").exists()
    assert not list((out / ".arrowquant-staging").glob("*.tmp"))  # no half-written part left
    assert hashlib.sha256((src / "model.parquet").read_bytes()).hexdigest() == before
    r = run(str(src), str(out), "resume")
    assert r.returncode == 0, r.stderr
    assert digest(out) == expect


def test_input_changing_during_the_run_is_detected(tmp_path):
    src = model_with_many_chunks(tmp_path / "src")
    target = src / "model.parquet"
    touched = []

    def progress(msg, frac):
        if not touched:
            touched.append(msg)
            with open(target, "ab") as f:  # the file grows under the reader
                f.write(b"\0" * 16)

    with pytest.raises(FormatError, match="changed while"):
        aq.quantize(src, tmp_path / "out", progress=progress)
    assert not (tmp_path / "out" / "metadata.json").exists()
