"""The quantizer writes the same bytes as the code the golden data was made
with (tests/golden/cases.py): Parquet files and GGUF files byte for byte,
JSON files without their times and absolute paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import cases  # noqa: E402


@pytest.mark.parametrize("name", [*cases.CASES, *cases.GGUF_CASES])
def test_same_bytes_as_golden(name: str, tmp_path: Path) -> None:
    expected_dir = cases.DATA / name
    want = {p.relative_to(expected_dir).as_posix(): p.read_bytes()
            for p in sorted(expected_dir.rglob("*")) if p.is_file()}
    got = cases.snapshot(cases.run_case(name, tmp_path))
    assert sorted(got) == sorted(want), f"{name}: other files"
    for rel in want:
        assert got[rel] == want[rel], f"{name}/{rel} differs from the golden output"
