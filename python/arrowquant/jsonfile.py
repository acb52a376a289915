"""Every JSON (and YAML) document a user or another tool hands in is read
here and checked against a schema of what ArrowQuant reads from it, before
use. A document that is not JSON, not UTF-8, or holds a value of the wrong
type is a MetadataError (a FormatError) naming the file and the key, never a
KeyError / TypeError further on.

A schema is a Python type (`str`, `int` (no bool), `float` (int or float, no
bool), `bool`, `dict`, `list`), a tuple of schemas (any of them), a dict
{key: schema} (an object with at least those keys; `Opt(schema)` marks a key
that may be missing or null), `[schema]` (a list of items), `MapOf(schema)`
(an object with any keys, each value of that schema), or ANY."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .errors import FormatError, MetadataError
from .text import decode_text

PathLike = Union[str, Path]
ANY = object()
MAX_JSON_BYTES = 256 * 1024 * 1024  # larger "metadata" is not metadata


class Opt:
    """A key that may be missing or null."""

    def __init__(self, schema: Any):
        self.schema = schema


class MapOf:
    """An object with any (string) keys whose values follow `schema`."""

    def __init__(self, schema: Any):
        self.schema = schema


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
          dict: "an object", list: "a list", type(None): "null"}


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    if isinstance(schema, (dict, MapOf)):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    return _NAMES.get(schema, str(schema))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, allow_nan=True) if not isinstance(value, str) \
        else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value: Any, schema: Any) -> bool:
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if schema is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, schema)


def check(value: Any, schema: Any, where: Any, key: str = "") -> Any:
    """`value` if it follows `schema`; else a MetadataError naming `where`
    (the file) and the key path (`a.b[3]`)."""
    if schema is ANY:
        return value
    if isinstance(schema, Opt):
        return None if value is None else check(value, schema.schema, where, key)
    if isinstance(schema, tuple):
        for s in schema:
            try:
                return check(value, s, where, key)
            except MetadataError:
                continue
        raise _wrong(value, schema, where, key)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise _wrong(value, schema, where, key)
        for k, s in schema.items():
            sub = f"{key}.{k}" if key else k
            if k not in value or value[k] is None:
                if isinstance(s, Opt):
                    continue
                raise MetadataError(f"{where}: key {sub!r} is missing")
            check(value[k], s, where, sub)
        return value
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise _wrong(value, schema, where, key)
        for k, v in value.items():
            check(v, schema.schema, where, f"{key}.{k}" if key else str(k))
        return value
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise _wrong(value, schema, where, key)
        for i, v in enumerate(value):
            check(v, schema[0], where, f"{key}[{i}]")
        return value
    if not _is(value, schema):
        raise _wrong(value, schema, where, key)
    return value


def _wrong(value: Any, schema: Any, where: Any, key: str) -> MetadataError:
    what = f"key {key!r}" if key else "the document"
    return MetadataError(f"{where}: {what} must be {_describe(schema)}, got "
                         f"{type(value).__name__} {_short(value)}")


def parse_json(text: Union[str, bytes], where: Any, schema: Any = ANY) -> Any:
    """A JSON document from text (or UTF-8 bytes), checked against `schema`.
    (NaN / Infinity, which Python's json writes, are read as floats.)"""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = decode_text(bytes(text), where, "the document")
        except FormatError as e:
            raise MetadataError(str(e)) from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise MetadataError(f"{where}: cannot read JSON: not valid JSON ({e})") from None
    return check(doc, schema, where)


def read_json(path: PathLike, schema: Any = ANY, what: Optional[str] = None) -> Any:
    """The JSON document in `path`, checked against `schema`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except IsADirectoryError:
        raise MetadataError(f"{p}: is a directory, expected a JSON file") from None
    except FileNotFoundError:
        raise MetadataError(f"{p}: missing") from None
    except OSError as e:
        raise MetadataError(f"{p}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise MetadataError(f"{p}: larger than {MAX_JSON_BYTES >> 20} MiB; not a metadata file")
    return parse_json(raw, what or p, schema)


def read_json_object(path: PathLike, schema: Any = None) -> Dict[str, Any]:
    """A JSON object (keys as in `schema` checked)."""
    return read_json(path, dict if schema is None else schema)


def dumps(value: Any, **kw: Any) -> str:
    """JSON text ArrowQuant writes or prints: strict JSON (NaN and Inf become
    null), so that every JSON reader can read it back."""
    return json.dumps(finite_json(value), allow_nan=False, **kw)


def finite_json(value: Any) -> Any:
    """`value` with non-finite floats replaced by null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# What ArrowQuant reads from the JSON files of a model folder (other keys are
# left alone): the one schema of each, used by every reader of that file.
MODEL_METADATA_SCHEMA = {"modality": Opt(str), "is_diffusion_model": Opt(bool),
                         "format": Opt(str)}
CONFIG_SCHEMA = {"_class_name": Opt(str), "architectures": Opt([str]), "model_type": Opt(str),
                 "_name_or_path": Opt(str)}
MODEL_INDEX_SCHEMA = {"_class_name": Opt(str)}
INDEX_SCHEMA = {"metadata": Opt(dict), "weight_map": MapOf(str)}
# A diffusers component's config.json (what the GGUF converter, calibration
# and the runtime read of it).
DIFFUSERS_CONFIG_SCHEMA = {
    **CONFIG_SCHEMA, "down_block_types": Opt([str]), "up_block_types": Opt([str]),
    "layers_per_block": Opt((int, [int])), "block_out_channels": Opt([int]),
    "in_channels": Opt(int), "sample_size": Opt((int, [int])),
    "cross_attention_dim": Opt((int, [int])), "num_class_embeds": Opt(int),
    "class_embed_type": Opt(str), "addition_embed_type": Opt(str),
    "num_embeds_ada_norm": Opt(int)}
