"""The docs' commands run as written.

Convention: a fenced ```sh, ```bash or ```python block in README.md or
docs/*.md preceded by the line `<!-- test -->` is runnable. The runnable
blocks of one document run in order, in one fresh temporary directory (later
blocks use the files earlier ones made): sh blocks with `bash -e -o pipefail`,
python blocks as scripts, with `arrowquant` and `python` on PATH.
`<!-- test: cli NAME -->` marks a block that needs the CLI subcommand NAME;
it is reported (warning) and left out while that subcommand does not exist.

The syntax check of every marked block is fast; running them builds tiny
transformers / diffusers models, so that part is marked slow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*test(?::\s*cli\s+(?P<cli>[\w-]+))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
LANGS = {"sh": "sh", "bash": "sh", "python": "python"}


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    code: str
    needs_cli: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def doc_files() -> List[Path]:
    docs = sorted((REPO / "docs").glob("*.md")) if (REPO / "docs").is_dir() else []
    readme = REPO / "README.md"
    return ([readme] if readme.exists() else []) + docs


def runnable_blocks(doc: Path) -> List[Block]:
    """The marked blocks of a Markdown file; a marker not followed by a
    sh/bash/python fence is an error."""
    lines = doc.read_text().splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = FENCE.match(lines[j].strip()) if j < len(lines) else None
        if not fence or fence.group("lang") not in LANGS:
            raise AssertionError(f"{doc}:{i + 1}: <!-- test --> must precede a ```sh, ```bash "
                                 "or ```python block")
        k = j + 1
        while k < len(lines) and not lines[k].strip().startswith("```"):
            k += 1
        if k >= len(lines):
            raise AssertionError(f"{doc}:{j + 1}: unterminated code block")
        blocks.append(Block(doc, j + 1, LANGS[fence.group("lang")], "\n".join(lines[j + 1:k]) + "\n",
                            m.group("cli")))
        i = k + 1
    return blocks


def test_marked_blocks_are_well_formed():
    found = 0
    for doc in doc_files():
        for b in runnable_blocks(doc):
            found += 1
            if b.lang == "python":
                compile(b.code, b.where, "exec")
            else:
                r = subprocess.run(["bash", "-n"], input=b.code, text=True, capture_output=True)
                assert r.returncode == 0, f"{b.where}: {r.stderr}"
    assert found >= 10, "the user guide and migration page should carry runnable blocks"


def _env(tmp: Path) -> dict:
    """PATH with `arrowquant` and `python` for the interpreter running the
    tests, the source tree importable, Hugging Face offline."""
    bindir = tmp / ".bin"
    bindir.mkdir(exist_ok=True)
    py = sys.executable
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{py}" "$@"\n')
    (bindir / "arrowquant").write_text(
        f'#!/bin/sh\nexec "{py}" -c "import sys; from arrowquant.cli import main; '
        f'sys.exit(main())" "$@"\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    import arrowquant  # the one under test: installed in CI, python/ in a dev tree

    package_root = str(Path(arrowquant.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONWARNINGS="ignore::FutureWarning")
    return env


def _cli_has(command: str, env: dict, cwd: Path) -> bool:
    r = subprocess.run(["arrowquant", command, "--help"], env=env, cwd=cwd,
                       capture_output=True, text=True)
    return r.returncode == 0


def _docs_with_blocks() -> List[Path]:
    return [d for d in doc_files() if runnable_blocks(d)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", _docs_with_blocks(), ids=lambda p: p.name)
def test_doc_blocks_run(doc: Path, tmp_path: Path):
    needs = {"torch": "torch", "transformers": "transformers", "diffusers": "diffusers",
             "gguf": "gguf", "safetensors": "safetensors"}
    blocks = runnable_blocks(doc)
    missing = [m for m in needs if any(f"import {m}" in b.code or f"from {m}" in b.code
                                       for b in blocks) and _missing(m)]
    if missing:
        pytest.skip(f"{doc.name} needs {', '.join(missing)}")
    env = _env(tmp_path)
    skipped = []
    for b in blocks:
        if b.needs_cli and not _cli_has(b.needs_cli, env, tmp_path):
            skipped.append(f"{b.where} (needs `arrowquant {b.needs_cli}`)")
            continue
        if b.lang == "python":
            cmd = [sys.executable, "-c", b.code]
        else:
            cmd = ["bash", "-e", "-o", "pipefail", "-c", b.code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (f"{b.where} failed (exit {r.returncode}):\n{b.code}\n"
                                   f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    if skipped:
        warnings.warn("doc blocks not run: " + "; ".join(skipped))


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_marker_parser_rejects_a_stray_marker(tmp_path: Path):
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- test -->\nsome text\n```python\nprint(1)\n```\n")
    with pytest.raises(AssertionError, match="must precede"):
        runnable_blocks(bad)
    good = tmp_path / "good.md"
    good.write_text("<!-- test: cli export-gguf -->\n\n```sh\necho hi\n```\n```python\nx\n```\n")
    blocks = runnable_blocks(good)
    assert len(blocks) == 1 and blocks[0].needs_cli == "export-gguf" and blocks[0].code == "echo hi\n"
