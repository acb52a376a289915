"""The second reliability pass (issue 12): each defect an adversarial run
found, reproduced through the command line (`python -m arrowquant`), and the
contract every user error keeps: an exit code in 1..127, no traceback, a
message naming the file, the input unchanged, no finished-looking output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest

import arrowquant
from conftest import write_v1

PYTHON_DIR = str(Path(arrowquant.__file__).resolve().parent.parent)


def cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": PYTHON_DIR, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "arrowquant", *map(os.fsdecode, args)],
                          capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout,
                          errors="replace")


def snapshot(p: Path) -> Dict[str, str]:
    """Every file under p (or p itself) by relative path: SHA-256 of its bytes."""
    p = Path(p)
    if p.is_file():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()}
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink()}


def user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert 1 <= r.returncode <= 127 and r.returncode != 70, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def finished_looking(out: Path) -> bool:
    return (out / "metadata.json").is_file() and not (out / ".arrowquant-staging").exists()


def write_safetensors(d: Path, tensors: Dict[str, np.ndarray], name: str = "model.safetensors",
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / name),
              metadata=metadata)
    return d / name


def raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    """A SafeTensors file from a header as given (names and shapes unchecked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def small(seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((8, 64)).astype(np.float32),
            "b.weight": rng.standard_normal((4, 64)).astype(np.float16)}


def pipeline(root: Path) -> Path:
    (root).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    write_safetensors(root / "unet", small(1), "diffusion_pytorch_model.safetensors")
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


# ------------------------------------------------------- 1. --resume from the CLI


def many_chunks(root: Path) -> Path:
    rng = np.random.default_rng(5)
    tensors = {f"layers.{i}.weight": rng.standard_normal((256, 512)).astype(np.float16)
               for i in range(4)}
    tensors["norm.weight"] = np.ones(512, np.float16)
    return write_v1(root, tensors)


def outputs(d: Path) -> Dict[str, str]:
    return {k: v for k, v in snapshot(d).items()
            if k.endswith(".parquet") or k.endswith(".index.json")}


def kill_when_staged(args, env, out: Path, parts: int = 2) -> None:
    e = {**os.environ, "PYTHONPATH": PYTHON_DIR, **env}
    proc = subprocess.Popen([sys.executable, "-m", "arrowquant", *args], env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / ".arrowquant-staging").glob("*.part"))) >= parts:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not finished_looking(out)


CONFIG_SOURCES = {
    "defaults": ([], {}),
    "profile": (["--profile", "cloud"], {}),
    "yaml": (["--config", "{yaml}"], {}),
    "environment": ([], {"ARROW_QUANT_BIT_WIDTH": "2", "ARROW_QUANT_GROUP_SIZE": "64",
                         "ARROW_QUANT_MAX_MEMORY_MB": "64"}),
    "flags": (["--bits", "8", "--fallback-threshold", "8=0.5", "--fallback-threshold", "4=0.8",
               "--keep", "norm*", "--bits-for", "layers.1.*=2"], {}),
}


@pytest.mark.parametrize("source", sorted(CONFIG_SOURCES))
def test_kill_9_then_resume_through_the_cli(tmp_path, source):
    """Item 1: SIGKILL mid-run, then `--resume` with the same settings, given
    through each config source, finishes to the bytes of an uninterrupted run."""
    src = many_chunks(tmp_path / "src")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("bit_width: 4\ngroup_size: 32\nfallback_thresholds:\n  4: 0.6\n  8: 0.9\n"
                    "keep_patterns: ['norm.*']\n")
    extra, env = CONFIG_SOURCES[source]
    extra = [a.replace("{yaml}", str(yaml)) for a in extra]
    common = ["--chunk-size", "32KiB", "--engine", "reference", "--no-progress", *extra]
    full = tmp_path / "full"
    r = cli("quantize", src, full, *common, env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    kill_when_staged(["quantize", str(src), str(out), *common], env, out)
    r = cli("quantize", src, out, *common, "--resume", env=env)
    assert r.returncode == 0, r.stderr
    assert outputs(out) == outputs(full)
    assert finished_looking(out)


def test_resume_with_other_settings_is_refused_naming_the_output(tmp_path):
    src = many_chunks(tmp_path / "src")
    out = tmp_path / "out"
    common = ["--chunk-size", "32KiB", "--engine", "reference", "--no-progress"]
    kill_when_staged(["quantize", str(src), str(out), *common], {}, out)
    r = cli("quantize", src, out, *common, "--resume", "--bits", "8")
    user_error(r, str(out), "other settings")
