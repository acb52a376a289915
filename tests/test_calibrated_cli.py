"""`arrowquant calibrate` then `arrowquant quantize --calibration` on a
diffusers pipeline, through the command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from arrowquant.cli import main


def test_calibrate_then_quantize_pipeline(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=8)
    src = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(src)
    stats = tmp_path / "stats.parquet"
    assert main(["calibrate", str(src), "--out", str(stats), "--num-time-groups", "2",
                 "--samples", "2", "--steps", "4"]) == 0
    assert "2 time group(s)" in capsys.readouterr().out

    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--bits", "4", "--calibration", str(stats),
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output_format"] == "arrowquant-parquet-v2-pipeline"
    rows = pq.read_table(out / "unet" / "model.parquet",
                         columns=["layer_name", "quant_type", "method", "spatial_quant_json",
                                  "activation_stats_json"]).to_pylist()
    calibrated = [r for r in rows if r["method"] == "importance"]
    assert calibrated, "no layer used the statistics"
    assert all(r["activation_stats_json"] for r in calibrated)
    # Timestep-embedding layers stay at INT8 or above.
    for r in rows:
        if "time_emb" in r["layer_name"] and r["quant_type"] != "none":
            assert r["quant_type"] == "int8", r["layer_name"]
    meta = json.loads((out / "unet" / "metadata.json").read_text())
    assert meta["quantization"]["calibration"] == str(stats.resolve())


def test_calibrated_code_grid(tmp_path, capsys):
    """--method grid-nl with calibration: the statistics weight the grid's own
    search (rows stay grid rows, superblock parameters kept); timestep layers
    at INT8 take a learned 8-bit table; the file loads."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import arrowquant as aq

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=8)
    src = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(src)
    stats = tmp_path / "stats.parquet"
    assert main(["calibrate", str(src), "--out", str(stats), "--num-time-groups", "2",
                 "--samples", "2", "--steps", "4"]) == 0
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--bits", "4", "--calibration", str(stats),
                 "--method", "grid-nl", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    rows = pq.read_table(out / "unet" / "model.parquet",
                         columns=["layer_name", "quant_type", "method", "param_code_bits",
                                  "activation_stats_json"]).to_pylist()
    calibrated = [r for r in rows if r["activation_stats_json"]]
    assert calibrated and all(r["quant_type"].startswith("grid") for r in calibrated)
    assert any(r["quant_type"] == "grid4" and r["method"] == "grid-nl" and r["param_code_bits"]
               for r in calibrated)
    assert all(r["method"] == "grid-learned" for r in rows if r["quant_type"] == "grid8")
    assert json.loads((out / "metadata.json").read_text())["format_version"] == 3
    m = aq.load(out / "unet")
    for name in m:
        assert np.isfinite(m[name]).all()
