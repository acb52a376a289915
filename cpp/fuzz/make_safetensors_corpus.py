"""Writes the seed corpus of cpp/fuzz/safetensors_header_fuzz.cc into
cpp/fuzz/corpus/safetensors/: small valid files made by the `safetensors`
package and hand-made attacks. Run from the repository root:

    python cpp/fuzz/make_safetensors_corpus.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save

OUT = Path(__file__).resolve().parent / "corpus" / "safetensors"


def raw(header: bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    rng = np.random.default_rng(0)
    s["valid_f32_2d"] = save({"w": rng.standard_normal((3, 4)).astype(np.float32)})
    s["valid_mixed"] = save(
        {
            "a": np.arange(6, dtype=np.int64).reshape(2, 3),
            "b": np.ones((2,), dtype=np.float16),
            "c": np.array(True),
            "d": np.zeros((0, 3), dtype=np.uint8),
            "e": np.arange(4, dtype=np.int8),
        },
        metadata={"format": "pt", "note": "caf\u00e9"},
    )
    s["valid_empty"] = save({})
    ok = json.dumps({"t": entry("U8", [2], 0, 2)})
    s["attack_len_2_63"] = raw(ok, b"xy", length=1 << 63)
    s["attack_len_max"] = raw(ok, b"xy", length=(1 << 64) - 1)
    s["attack_header_past_file"] = raw(ok, b"xy", length=len(ok) + 100)
    s["attack_offsets_past_end"] = raw(json.dumps({"t": entry("U8", [4], 0, 4)}), b"xy")
    s["attack_overlap"] = raw(json.dumps({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}), b"x" * 6)
    s["attack_out_of_order_gap"] = raw(json.dumps({"b": entry("U8", [2], 4, 6), "a": entry("U8", [2], 0, 2)}), b"x" * 6)
    s["attack_begin_after_end"] = raw(json.dumps({"a": entry("U8", [2], 4, 2)}), b"x" * 4)
    s["attack_numel_overflow"] = raw(json.dumps({"a": entry("F32", [1 << 32, 1 << 32], 0, 0)}))
    s["attack_bytes_overflow"] = raw(json.dumps({"a": entry("F64", [1 << 61], 0, 0)}))
    s["attack_negative_dim"] = raw('{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}')
    s["attack_huge_dim"] = raw('{"a":{"dtype":"U8","shape":[99999999999999999999999],"data_offsets":[0,0]}}')
    s["attack_float_dim"] = raw('{"a":{"dtype":"U8","shape":[1e3],"data_offsets":[0,1000]}}')
    s["attack_unknown_dtype"] = raw(json.dumps({"a": entry("F12", [1], 0, 1)}), b"x")
    s["attack_duplicate_names"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"xy")
    s["attack_deep_nesting"] = raw('{"a":{"x":' + "[" * 5000 + "]" * 5000 + "}}")
    s["attack_enormous_json"] = raw(
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"pad":"' + "A" * 60000 + '"}}', b"x")
    s["attack_non_utf8_name"] = raw(b'{"\xff\xfe":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x")
    s["attack_lone_surrogate"] = raw('{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x")
    s["attack_byte_mismatch"] = raw(json.dumps({"a": entry("F32", [2], 0, 4)}), b"xxxx")
    s["attack_metadata_not_str"] = raw('{"__metadata__":{"k":1}}')
    s["attack_trailing_garbage"] = raw(ok + " ]", b"xy")
    s["attack_truncated_json"] = raw(ok[:-3], b"xy")
    return s


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(seeds())} seeds to {OUT}")


if __name__ == "__main__":
    main()
