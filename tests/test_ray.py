"""--executor ray (run/ray_executor.py) on a local Ray cluster: the output
directory is the bytes a one-machine run writes (timing fields aside), for
sharded SafeTensors and Parquet V1, rtn, mse and superblock, with per-layer
fallback; a worker killed mid-task is retried to the same bytes; a killed
driver leaves a directory --resume finishes, with or without Ray; bad input
fails with the one-machine error."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

import arrowquant as aq
from arrowquant.cli import main
from arrowquant.errors import (ArrowQuantError, ConfigurationError, QuantizationError,
                               ValidationError)
from conftest import write_v1

SECONDS = re.compile(rb'"seconds": [0-9.e+-]+')


def test_import_arrowquant_never_imports_ray():
    code = ("import sys, arrowquant, arrowquant.cli, arrowquant.run.ray_executor, "
            "arrowquant.run.runner; print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_gguf_output_is_refused_with_ray(tmp_path):
    with pytest.raises(ConfigurationError, match="GGUF"):
        aq.quantize(tmp_path, tmp_path / "o.gguf", output_format="gguf", executor="ray")


def test_without_ray_the_error_comes_before_the_output_is_touched(tmp_path):
    src = write_v1(tmp_path / "v1", tensors(6, layers=1))
    code = ("import sys; sys.modules['ray'] = None; import arrowquant as aq\n"
            "try:\n    aq.quantize(sys.argv[1], sys.argv[2], executor='ray', progress=False)\n"
            "except aq.errors.ConfigurationError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert "pip install 'arrowquant[ray]'" in r.stdout, r.stderr
    assert not (tmp_path / "out").exists()


def test_work_units_are_contiguous_ranges_of_one_file_with_a_memory_estimate(tmp_path):
    from arrowquant.run.layout import PipelineOptions, chunk_rows, plan_chunks
    from arrowquant.run.ray_tasks import UnitChunk, group_units
    from arrowquant.planning.plan import RulePlanner
    from arrowquant.sources import open_model

    src = write_sharded(tmp_path / "st", tensors(5))
    opts = PipelineOptions(chunk_size=96 * 1024)
    with open_model(src) as source:
        plans = RulePlanner(bits=4).plan(source.tensors)
        pending = [UnitChunk(ti, c, 64, plans[t.name], False)
                for ti, t in enumerate(source.tensors)
                for c in plan_chunks(t, chunk_rows(t, plans[t.name], opts))]
        units = group_units(source, pending, 200 * 1024, opts, 0)
        assert [uc for u in units for uc in u.chunks] == pending  # every chunk once, in order
        assert len({u.file for u in units}) == 3
        for u in units:
            assert {source.location(source.tensors[uc.ti].name) for uc in u.chunks} == {u.file}
            assert u.nbytes <= 200 * 1024 or len(u.chunks) == 1
            keys = [(uc.ti, uc.chunk.index) for uc in u.chunks]
            assert all(b in ((a[0], a[1] + 1), (a[0] + 1, 0)) for a, b in zip(keys, keys[1:]))
            # outputs held twice + read buffers + a fixed base
            assert u.memory > 64 * 1024 * 1024 + u.nbytes // 8


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def tensors(seed: int, layers: int = 3, rows: int = 192, cols: int = 256) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"model.embed_tokens.weight": (rng.standard_normal((600, cols)) * 0.02).astype(np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj.weight"] = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
        out[f"{p}.mlp.up_proj.weight"] = (rng.standard_t(3, (2 * rows, cols)) * 0.05).astype(np.float32)
        out[f"{p}.input_layernorm.weight"] = np.ones(cols, np.float16)
    out["lm_head.weight"] = (rng.standard_normal((600, cols)) * 0.02).astype(np.float16)
    return out


def write_sharded(root: Path, ts: Dict[str, np.ndarray], shards: int = 3) -> Path:
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    names = list(ts)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: ts[n] for n in part}, str(root / fname))
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(a.nbytes for a in ts.values())},
                    "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-models")
    return {"safetensors": write_sharded(root / "st", tensors(1)),
            "parquet": write_v1(root / "v1", tensors(2))}


def snapshot(d: Path) -> Dict[str, bytes]:
    """Every file; JSON files without their timing fields (`seconds`)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[p.relative_to(d).as_posix()] = SECONDS.sub(b'"seconds": 0', data) \
                if p.suffix == ".json" else data
    return out


def quantize_both(src: Path, tmp: Path, args: List[str]) -> Dict[str, Dict[str, bytes]]:
    """The same CLI run on one machine and with Ray, into the same path."""
    got = {}
    for executor in ("local", "ray"):
        out = tmp / "out"
        extra = ["--executor", "ray", "--ray-cpus-per-task", "1"] if executor == "ray" else []
        assert main(["quantize", str(src), str(out), "--no-progress", *args, *extra]) == 0
        got[executor] = snapshot(out)
        out.rename(tmp / executor)
    return got


METHODS = {
    "rtn": ["--method", "rtn", "--param-dtype", "float32"],
    "mse": ["--method", "mse"],
    "superblock": ["--method", "mse", "--param-dtype", "superblock", "--group-size", "32"],
    "grid": ["--method", "grid-learned"],  # each task learns the same table per tensor
}


@pytest.mark.parametrize("fmt", ["safetensors", "parquet"])
@pytest.mark.parametrize("method", list(METHODS))
def test_byte_identical_with_and_without_ray(cluster, models, fmt, method, tmp_path):
    # Several chunks per tensor, several output shards, the default floors.
    args = ["--chunk-size", "96KiB", "--shard-size", "160KiB", *METHODS[method]]
    got = quantize_both(models[fmt], tmp_path, args)
    assert sorted(got["ray"]) == sorted(got["local"])
    assert len([f for f in got["local"] if f.endswith(".parquet")]) > 1
    for name, data in got["local"].items():
        assert got["ray"][name] == data, f"{fmt}/{method}: {name} differs"
    report = json.loads(got["local"]["quantization_report.json"])
    assert max(t["chunks"] for t in report["tensors"]) > 1


def test_fallback_redone_at_a_wider_width_is_identical(cluster, models, tmp_path):
    # A floor INT4 cannot reach: every tensor is redone at INT8, the ones of
    # several chunks measured over all chunks first.
    args = ["--chunk-size", "96KiB", "--fallback-threshold", "4=0.99995"]
    got = quantize_both(models["safetensors"], tmp_path, args)
    assert got["ray"] == got["local"]
    report = json.loads(got["local"]["quantization_report.json"])
    redone = [t for t in report["tensors"] if t["bits"] == 8 and t["chunks"] > 1]
    assert redone and all("redone at int8" in t["decisions"][0] for t in redone)


def test_fail_fast_error_is_the_one_machine_error(cluster, models, tmp_path):
    kw = dict(bits=4, chunk_size="96KiB", fail_fast=True, min_cosine={4: 0.99995},
              progress=False)
    errors = []
    for executor in ("local", "ray"):
        with pytest.raises(QuantizationError) as exc:
            aq.quantize(models["parquet"], tmp_path / executor, executor=executor,
                        ray_cpus_per_task=1, **kw)
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    assert "below the floor" in errors[0]


def test_nan_fails_with_the_one_machine_error(cluster, tmp_path):
    ts = tensors(3)
    ts["model.layers.1.mlp.up_proj.weight"][250, 7] = np.nan
    src = write_sharded(tmp_path / "nan", ts)
    errors = []
    for executor in ("local", "ray"):
        with pytest.raises(ValidationError) as exc:
            aq.quantize(src, tmp_path / executor, chunk_size="96KiB", progress=False,
                        executor=executor, ray_cpus_per_task=1)
        errors.append(str(exc.value))
        assert not (tmp_path / executor / "metadata.json").exists()
    assert errors[0] == errors[1]
    assert "model.layers.1.mlp.up_proj.weight" in errors[0]
    assert "model-0000" in errors[0] and ".safetensors" in errors[0]  # the file


def test_worker_killed_mid_task_is_retried_to_the_same_bytes(cluster, models, tmp_path,
                                                             monkeypatch, capsys):
    args = ["--chunk-size", "96KiB", "--method", "rtn"]
    src = models["safetensors"]
    assert main(["quantize", str(src), str(tmp_path / "out"), "--no-progress", *args]) == 0
    (tmp_path / "out").rename(tmp_path / "local")
    marker = tmp_path / "killed"
    monkeypatch.setenv("ARROWQUANT_RAY_TEST_KILL", f"3:{marker}")
    assert main(["quantize", str(src), str(tmp_path / "out"), "--no-progress", "-v",
                 "--executor", "ray", "--ray-cpus-per-task", "1", *args]) == 0
    assert marker.exists()  # the task of unit 3 killed its process once
    (tmp_path / "out").rename(tmp_path / "ray")
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")
    err = capsys.readouterr().err
    assert re.search(r"unit 4 on \S+:\d+: ", err)  # per unit (1-based) ...
    assert re.search(r"ray worker \S+:\d+: \d+ units", err)  # ... and per worker


def model_with_many_units(root: Path) -> Path:
    rng = np.random.default_rng(9)
    ts = {f"layers.{i}.weight": rng.standard_normal((512, 512)).astype(np.float16)
          for i in range(24)}
    return write_v1(root, ts)


def start(src: Path, out: Path, *flags: str) -> subprocess.Popen:
    code = "import sys; from arrowquant.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "quantize", str(src), str(out),
                             "--no-progress", "--chunk-size", "64KiB", "--group-size", "64",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_parts(proc: subprocess.Popen, out: Path, parts: int) -> int:
    staging = out / ".arrowquant-staging"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if staging.exists() and len(list(staging.glob("*.part"))) >= parts:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(staging.glob("*.part")))


@pytest.mark.parametrize("then", ["local", "ray"])
def test_driver_killed_then_resume_with_or_without_ray(cluster, tmp_path, then):
    src = model_with_many_units(tmp_path / "src")
    ray_flags = ("--executor", "ray", "--ray-address", cluster, "--ray-cpus-per-task", "1")
    out = tmp_path / "out"
    proc = start(src, out, *ray_flags)
    staged = kill_after_parts(proc, out, 40)
    assert not (out / "metadata.json").exists()
    print(f"driver killed with {staged} parts staged; resumed with {then}")
    again = start(src, out, "--resume", *(ray_flags if then == "ray" else ()))
    assert again.wait() == 0, again.stderr.read()
    got = snapshot(out)
    out.rename(tmp_path / "resumed")
    assert main(["quantize", str(src), str(out), "--no-progress", "--chunk-size", "64KiB",
                 "--group-size", "64"]) == 0
    expect = snapshot(out)
    assert got.keys() == expect.keys()
    for name in expect:
        assert got[name] == expect[name], f"resumed with {then}: {name} differs"


def test_corrupt_row_group_fails_with_the_one_machine_error(cluster, tmp_path):
    ts = tensors(4)
    src = write_v1(tmp_path / "v1", ts)
    data = bytearray((src / "model.parquet").read_bytes())
    big = ts["model.layers.1.mlp.up_proj.weight"].tobytes()
    at = bytes(data).find(big[:64])
    assert at > 0
    data[at - 8: at + 8] = b"\xfe" * 16  # the snappy stream of one row group's data
    (src / "model.parquet").write_bytes(bytes(data))
    errors = []
    for executor in ("local", "ray"):
        with pytest.raises(ArrowQuantError) as exc:
            aq.quantize(src, tmp_path / executor, chunk_size="96KiB", progress=False,
                        executor=executor, ray_cpus_per_task=1)
        errors.append(f"{type(exc.value).__name__}: {exc.value}")
    assert errors[0] == errors[1]
    assert errors[0].startswith("FormatError: ") and "model.parquet: row group" in errors[0]
    assert "unreadable" in errors[0]


def test_odd_shapes_and_calibrated_plans_are_identical(cluster, tmp_path):
    """Scalars, empty and 1-D tensors (quantize_1d), a 4-D conv, and
    importance-weighted, equalized plans from calibration statistics."""
    from safetensors.numpy import save_file
    from arrowquant.calibration.stats import CalibrationStats, GroupStats

    rng = np.random.default_rng(7)
    (tmp_path / "m").mkdir()
    ts = {"a.weight": rng.standard_normal((300, 128)).astype(np.float16),
          "scalar": np.array(3.0, np.float32), "empty.weight": np.zeros((0, 64), np.float16),
          "b.bias": rng.standard_normal(128).astype(np.float32),
          "c.weight": rng.standard_normal((40, 3, 3, 8)).astype(np.float16),
          "l.weight": rng.standard_normal((200, 256)).astype(np.float16)}
    save_file(ts, str(tmp_path / "m" / "model.safetensors"))

    def group() -> GroupStats:
        m = (rng.random(256).astype(np.float32) + 0.1) ** 3
        return GroupStats(100, np.zeros(256, np.float32), m, np.sqrt(m))

    stats = CalibrationStats(groups={"l.weight": {0: group(), 1: group()}}, num_time_groups=2,
                             metadata={"num_train_timesteps": 1000,
                                       "time_group_ranges": [[0, 499], [500, 999]]})
    for kw in (dict(quantize_1d=True, fallback=True), dict(calibration=stats)):
        got = {}
        for executor in ("local", "ray"):
            out = tmp_path / "out"
            aq.quantize(tmp_path / "m", out, progress=False, executor=executor,
                        ray_cpus_per_task=1, chunk_size="16KiB", **kw)
            got[executor] = snapshot(out)
            out.rename(tmp_path / f"{executor}-{len(kw)}-{sorted(kw)[0]}")
        assert got["ray"] == got["local"], sorted(kw)


def test_diffusers_pipeline_is_identical(cluster, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    root = tmp_path / "pipe"
    for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"),
                        ("text_encoder", "model.safetensors")):
        (root / comp).mkdir(parents=True)
        save_file({f"{comp}.l{i}.weight": rng.standard_normal((128, 256)).astype(np.float16)
                   for i in range(3)}, str(root / comp / fname))
        (root / comp / "config.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    got = {}
    for executor in ("local", "ray"):
        out = tmp_path / "out"
        aq.quantize(root, out, progress=False, executor=executor, ray_cpus_per_task=1,
                    chunk_size="16KiB")
        got[executor] = snapshot(out)
        out.rename(tmp_path / executor)
    assert "unet/model.parquet" in got["local"]
    assert got["ray"] == got["local"]
