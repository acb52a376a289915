"""One spec, one path (issue 13): the package's import graph, where the
defaults live, and the defects the old shape produced, each checked through
the entry point a user takes."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, Set

import numpy as np
import pytest
from safetensors.numpy import save_file

import arrowquant as aq
from arrowquant.cli import main

PKG = Path(aq.__file__).resolve().parent
#: Old module paths kept for one release: they only re-export.
SHIMS = {"tensor", "plan", "pipeline", "parquet_v2", "safetensors_io", "metrics", "modality",
         "diffusion", "calibrated", "importance", "reference_search", "reference_superblock",
         "reference_importance", "units", "gguf_export", "compat"}


def _modules() -> Dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["arrowquant", *parts])] = p
    return out


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Package modules that `name` imports (at any depth of its code)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: Set[str] = set()
    tree = ast.parse(path.read_text())
    # Imports for type checkers only never run: not part of the graph.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                found.add(full if full in modules or full == "arrowquant._core" else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
    return {m for m in found if m in modules or m == "arrowquant._core"}


def test_no_import_cycle_and_only_the_engine_reaches_the_core():
    modules = _modules()
    graph = {n: _imports(n, p, modules) - {n} for n, p in modules.items()
             if n.split(".")[1:2] != [] and n.split(".")[1] not in SHIMS or n == "arrowquant"}
    core_users = sorted(n for n, deps in graph.items() if "arrowquant._core" in deps)
    assert core_users == ["arrowquant.engine.core"]
    # Cycles between modules (a package importing its own submodules is not one).
    state: Dict[str, int] = {}

    def visit(n: str, stack: list) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if d.startswith(n + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d in graph and state.get(d) is None:
                visit(d, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if state.get(n) is None:
            visit(n, [])


def test_modules_stay_small_or_say_why():
    for name, path in _modules().items():
        lines = path.read_text().count("\n")
        if lines > 500:
            head = path.read_text()[:600].lower()
            assert "one module" in head or "kept whole" in head, \
                f"{name}: {lines} lines and no reason at its top"


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_import_paths_still_work_and_say_where_to_go(old):
    sys.modules.pop(f"arrowquant.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module(f"arrowquant.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and "import from" in str(w.message)
               for w in caught)


def test_defaults_live_in_one_spec():
    spec = aq.QuantSpec()
    cfg = aq.DiffusionQuantConfig()
    assert (cfg.bit_width, cfg.group_size, cfg.scheme, cfg.method, cfg.param_dtype) == \
        (spec.bits, spec.group_size, spec.scheme, spec.method, spec.param_dtype)
    import inspect

    from arrowquant.spec import default_spec

    for fn in (aq.quantize_array, aq.reference.quantize_array, aq.quantize):
        params = inspect.signature(fn).parameters
        # Unset: None, filled from spec.default_spec(bits), never a second default.
        for k in ("group_size", "method", "param_dtype"):
            assert params[k].default is None, (fn, k)
        assert params["bits"].default == spec.bits, fn
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for bits in (2, 4, 8):
        want = default_spec(bits)
        for fn in (aq.quantize_array, aq.reference.quantize_array):
            qt = fn(x, bits=bits)
            assert (qt.group_size, qt.method, qt.param_dtype) == \
                (want.group_size, want.method, want.param_dtype), (fn, bits)
    assert default_spec(4) == spec
    plan = aq.TensorPlan("w", 4)
    assert plan.spec == spec
    parser_defaults = {a.dest: a.default for a in
                       __import__("arrowquant.cli").cli.build_parser()._subparsers._group_actions[0]
                       .choices["quantize"]._actions}
    # Unset CLI flags fall through to the config (None), never a second default.
    assert parser_defaults["method"] is None and parser_defaults["param_dtype"] is None


def _wide_model(tmp_path: Path) -> Path:
    d = tmp_path / "wide"
    d.mkdir()
    rng = np.random.default_rng(0)
    # One row of 400,000 float32 values: 1.6 MB, more than a 1 MiB budget holds.
    save_file({"w": rng.standard_normal((2, 400_000)).astype(np.float32),
               "v": rng.standard_normal((64, 64)).astype(np.float32)}, str(d / "model.safetensors"))
    return d


def test_max_memory_flag_beats_the_environment(tmp_path, monkeypatch, capsys):
    src = _wide_model(tmp_path)
    monkeypatch.setenv("ARROW_QUANT_MAX_MEMORY_MB", "1")
    assert main(["quantize", str(src), str(tmp_path / "a"), "--no-progress"]) == 2
    assert "max-memory" in capsys.readouterr().err
    # An explicit flag equal to the default still wins over the environment.
    assert main(["quantize", str(src), str(tmp_path / "b"), "--no-progress",
                 "--max-memory", "256MiB"]) == 0


def test_planner_neither_reopens_the_model_nor_measures_without_mixed_precision(tmp_path,
                                                                                monkeypatch):
    import arrowquant.sources as sources

    src = _wide_model(tmp_path)
    opened = []
    real = sources.open_model
    monkeypatch.setattr(sources, "open_model", lambda p: opened.append(p) or real(p))
    assert main(["quantize", str(src), str(tmp_path / "plain"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "plain" / "quantization_report.json").read_text())
    assert opened == []
    assert all("sensitivity" not in t["extra"] for t in report["tensors"])
    # With mixed precision the planner measures, on the source already open.
    assert main(["quantize", str(src), str(tmp_path / "mixed"), "--no-progress",
                 "--target-bpw", "5"]) == 0
    report = json.loads((tmp_path / "mixed" / "quantization_report.json").read_text())
    assert opened == []
    assert any("sensitivity" in t["extra"] for t in report["tensors"])


def test_first_version_settings_that_nothing_read_are_accepted_and_ignored(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("bit_width: 8\ncalibration_samples: 64\nenable_streaming: false\n")
    with pytest.warns(DeprecationWarning, match="calibration_samples"):
        cfg = aq.resolve_config(config_file=cfg_file, environ={})
    assert cfg.bit_width == 8
    assert "calibration_samples" not in cfg.to_dict() and "enable_streaming" not in cfg.to_dict()
    with pytest.warns(DeprecationWarning, match="ARROW_QUANT_CALIBRATION_SAMPLES"):
        aq.resolve_config(environ={"ARROW_QUANT_CALIBRATION_SAMPLES": "12"})


def test_quantize_returns_a_summary_for_every_format(tmp_path):
    src = _wide_model(tmp_path)
    s1 = aq.quantize(src, tmp_path / "p", progress=False)
    s2 = aq.quantize(src, tmp_path / "g.gguf", output_format="gguf", bits=8, progress=False)
    assert isinstance(s1, aq.QuantizeSummary) and isinstance(s2, aq.QuantizeSummary)
    assert s2.output_format == "gguf" and s2.files == [str(tmp_path / "g.gguf")]


def test_import_arrowquant_imports_no_optional_dependency():
    code = ("import sys, arrowquant; bad = [m for m in ('torch', 'diffusers', 'transformers', "
            "'ray') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    assert out.stdout.strip() == "[]"
