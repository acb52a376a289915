"""The output directory while a run writes it: the lock, the staging folder
with one part file per finished chunk (what makes `--resume` redo only the
unfinished chunks, to the same bytes), and the run.json that says which
settings and inputs the staged parts belong to."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ArrowQuantError, ConfigurationError, FormatError
from ..files import atomic_write_text, fresh, io_error
from ..formats.v2_schema import FORMAT_NAME, INDEX_NAME, PIPELINE_FORMAT, ChunkRecord
from ..jsonfile import Opt, check, read_json
from ..text import check_path_text, printable

STAGING = ".arrowquant-staging"
LOCK_NAME = ".arrowquant.lock"


class OutputLock:
    """An exclusive flock on OUTPUT/.arrowquant.lock. The kernel drops it when
    the process dies, so a crashed run never leaves it stuck."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        try:  # never through a symlink planted in its place
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise ArrowQuantError(f"{printable(self.path)}: cannot be used as the run's lock "
                                  f"({exc.strerror or exc}); remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArrowQuantError(
                f"{self.path.parent}: another arrowquant run (pid {holder}) is writing this output "
                "directory; wait for it or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None



PART_MAGIC = b"AQPART1\0"  # superblock chunks add "code_bytes" (FORMAT.md section 9)
_RECORD_FIELDS = ("layer_name", "row_start", "row_count", "dtype", "num_params", "quant_type",
                  "scheme", "method", "group_size", "param_dtype", "is_diffusion_model",
                  "modality", "time_aware_quant_json", "spatial_quant_json",
                  "activation_stats_json")


def part_name(tensor_index: int, chunk_index: int) -> str:
    return f"{tensor_index:06d}-{chunk_index:06d}.part"


def write_part(path: Path, rec: ChunkRecord, info: Dict[str, Any]) -> None:
    """A finished chunk as a staging file: magic, header length, JSON header,
    then the packed data, scales and zero points (float32). Written to *.tmp
    and renamed, so a killed run never leaves a part that looks complete."""
    scales = np.zeros(0, np.float32) if rec.scales is None else np.asarray(rec.scales, np.float32)
    zeros = np.zeros(0, np.float32) if rec.zero_points is None else np.asarray(rec.zero_points, np.float32)
    record = {k: getattr(rec, k) for k in _RECORD_FIELDS}
    record["shape"] = list(rec.shape)
    record["data_bytes"] = int(rec.data.nbytes)
    record["params"] = int(scales.size)
    codes = np.zeros(0, np.uint8)
    if rec.param_codes is not None:
        codes = np.ascontiguousarray(rec.param_codes, dtype=np.uint8)
        record["code_bytes"] = int(codes.size)
        record["param_code_bits"] = rec.param_code_bits
        record["superblock_groups"] = rec.superblock_groups
    if rec.code_levels is not None:  # float32 values: exact through JSON's float64
        record["code_levels"] = [float(v) for v in np.asarray(rec.code_levels, np.float32)]
    header = json.dumps({"info": info, "record": record}).encode()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(fresh(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(PART_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(memoryview(np.ascontiguousarray(rec.data, dtype=np.uint8)))
            f.write(memoryview(scales))
            f.write(memoryview(zeros))
            f.write(memoryview(codes))
        # No fsync: a killed process keeps the page cache; a part unreadable
        # after a power loss fails its size check and is redone on resume.
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise io_error(exc, f"writing {path}") from None


def _part_header(f: Any, size: int) -> Optional[Tuple[Dict[str, Any], int]]:
    head = f.read(16)
    if len(head) < 16 or head[:8] != PART_MAGIC:
        return None
    n = int.from_bytes(head[8:], "little")
    if n > size - 16:
        return None
    try:
        header = json.loads(f.read(n))
    except ValueError:
        return None
    rec = header.get("record", {})
    if size != 16 + n + rec.get("data_bytes", -1) + 8 * rec.get("params", -1) + \
            rec.get("code_bytes", 0):
        return None  # cut short
    return header, 16 + n


def read_part_info(path: Path) -> Optional[Dict[str, Any]]:
    """The info of a complete part, or None when it is missing or damaged."""
    try:
        with open(path, "rb") as f:
            found = _part_header(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return None
    return None if found is None else found[0]["info"]


def read_part(path: Path) -> ChunkRecord:
    """The chunk stored in a part (data read into memory)."""
    with open(path, "rb") as f:
        found = _part_header(f, os.fstat(f.fileno()).st_size)
        if found is None:
            raise ArrowQuantError(f"{path}: damaged staging part; rerun with --resume")
        header, _ = found
        r = header["record"]
        data = np.frombuffer(f.read(r["data_bytes"]), dtype=np.uint8)
        scales = np.frombuffer(f.read(4 * r["params"]), dtype=np.float32)
        zeros = np.frombuffer(f.read(4 * r["params"]), dtype=np.float32)
        codes = np.frombuffer(f.read(r["code_bytes"]), dtype=np.uint8) if "code_bytes" in r \
            else None
    quantized = r["quant_type"] != "none"
    return ChunkRecord(
        shape=tuple(r["shape"]), data=data, scales=scales if quantized else None,
        zero_points=zeros if quantized else None, param_codes=codes,
        param_code_bits=r.get("param_code_bits"), superblock_groups=r.get("superblock_groups"),
        code_levels=None if r.get("code_levels") is None
        else np.asarray(r["code_levels"], np.float32),
        **{k: r[k] for k in _RECORD_FIELDS})


RUN_MARKER = "arrowquant-run"
# Names the V2 writer gives its files (formats/v2_writer.py), final and temporary.
_V2_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.parquet|model-\d{5}\.parquet\.tmp|"
                      + re.escape(INDEX_NAME) + r"(\.tmp)?")
_META_SCHEMA = {"format": str, "tool": {"name": str}, "files": Opt([str]),
                "copied_files": Opt([str]), "components": Opt([str]), "copied": Opt([str])}
_RUN_SCHEMA = {"format": str, "kind": Opt(str), "writes": Opt([str])}


def read_own_metadata(out: Path) -> Optional[Dict[str, Any]]:
    """metadata.json of an ArrowQuant output, or None when `out` holds none.
    A metadata.json ArrowQuant did not write (no format marker of its own) is
    an ArrowQuantError: such a folder is never resumed, overwritten or read
    as output."""
    path = out / "metadata.json"
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ArrowQuantError(f"{printable(path)}: not a file ArrowQuant wrote; refusing to use "
                              f"{printable(out)} as output (choose another output path)")
    meta = read_json(path, dict)
    if meta.get("format") not in (FORMAT_NAME, PIPELINE_FORMAT) or \
            not isinstance(meta.get("tool"), dict) or meta["tool"].get("name") != "arrowquant":
        raise ArrowQuantError(f"{printable(path)}: this metadata.json was not written by "
                              f"ArrowQuant; refusing to use {printable(out)} as output (choose "
                              "another output path)")
    return check(meta, _META_SCHEMA, path)


def _written(out: Path) -> Tuple[set, bool]:
    """Names in `out` that ArrowQuant's own records say it wrote, and whether
    V2 model file names count as its own (an interrupted model run)."""
    names = {STAGING, LOCK_NAME}
    meta = read_own_metadata(out)
    marks = out / STAGING / "writes.json"
    # run.json: the settings file of an interrupted model run (check_run_file).
    v2 = (out / STAGING / "run.json").is_file()
    if meta is not None:
        names |= {"metadata.json", "quantization_report.json"}
        for key in ("files", "copied_files", "components", "copied"):
            names |= set(meta.get(key) or [])
        if meta["format"] == FORMAT_NAME and len(meta.get("files") or []) > 1:
            names.add(INDEX_NAME)
    if marks.is_file() and not marks.is_symlink():
        run = read_json(marks, dict)
        if run.get("format") == RUN_MARKER:
            check(run, _RUN_SCHEMA, marks)
            names |= set(run.get("writes") or [])
            v2 = v2 or run.get("kind") == "model"
    names |= {n + ".tmp" for n in names}
    return names, v2


def _foreign(out: Path) -> List[str]:
    """Entries of `out` that ArrowQuant did not provably write (all of them
    when it holds no record of ArrowQuant's)."""
    names, v2 = _written(out)
    entries = sorted(os.listdir(out))
    return [n for n in entries if n not in names and not (v2 and _V2_FILE.fullmatch(n))]


def remove_output(out: Path) -> None:
    """Deletes what ArrowQuant wrote in `out` and nothing else: refused (an
    ArrowQuantError naming the first foreign entry) when `out` holds anything
    its records do not account for. Symlinks are removed, never followed;
    component folders of a pipeline are checked the same way, recursively."""
    foreign = _foreign(out)
    if foreign:
        raise ArrowQuantError(
            f"{printable(out)}: holds {printable(foreign[0])!s}"
            + (f" and {len(foreign) - 1} more entries" if len(foreign) > 1 else "")
            + " that ArrowQuant did not write; refusing to delete it (choose another output "
              "path, or remove them yourself)")
    meta = read_own_metadata(out) or {}
    components = set(meta.get("components") or [])
    for name in sorted(os.listdir(out)):
        child = out / name
        if name == LOCK_NAME:
            continue
        if child.is_symlink() or not child.is_dir():
            child.unlink()
        elif name in components:
            remove_output(child)
            child.rmdir()
        else:
            shutil.rmtree(child)


def prepare_output(out: Path, overwrite: bool, resume: bool, check_only: bool = False) -> None:
    """Refuses an output that exists (unless overwrite / resume allow it) and,
    unless check_only, empties it for --overwrite (only what ArrowQuant
    wrote: remove_output) and creates it."""
    check_path_text(out, "output path")
    if out.is_symlink() and not out.exists():
        raise ArrowQuantError(f"{printable(out)}: a dangling symlink; choose another output path")
    if out.exists() and not out.is_dir():
        raise ArrowQuantError(f"{printable(out)}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if resume:
            read_own_metadata(out)  # a foreign metadata.json is never resumed into
            if not (out / STAGING).is_dir() or _foreign(out):
                raise ArrowQuantError(f"{printable(out)}: exists but holds no interrupted "
                                      "ArrowQuant run to resume")
            return
        if not overwrite:
            raise ArrowQuantError(f"{printable(out)}: already exists; pass --overwrite to replace "
                                  "it or --resume to finish an interrupted run")
        foreign = _foreign(out)
        if foreign:
            remove_output(out)  # raises, naming what is foreign
        if check_only:
            return
        lock = OutputLock(out)
        lock.acquire()  # refuse to delete what a live run is writing
        try:
            remove_output(out)
        finally:
            lock.release()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


def mark_run(out: Path, kind: str, writes: List[str]) -> None:
    """Records in the staging folder that ArrowQuant is writing `out` and the
    names it will write there (what --overwrite may delete if the run dies)."""
    (out / STAGING).mkdir(exist_ok=True)
    path = out / STAGING / "writes.json"
    atomic_write_text(path, json.dumps({"format": RUN_MARKER, "kind": kind, "writes": writes}))


def fingerprint(weight_files: List[Path]) -> List[List[Any]]:
    """(path, size, mtime) of each input file: what a resumed run must find unchanged."""
    out = []
    for p in weight_files:
        st = Path(p).stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def check_run_file(out: Path, source_root: Path, settings: Dict[str, Any],
                   prints: List[List[Any]]) -> None:
    """Records the run's settings and inputs in the staging folder, or checks
    that an interrupted run being resumed had the same ones."""
    run_file = out / STAGING / "run.json"
    # Compared as JSON: what the file holds after the round trip (integer
    # keys become strings, tuples lists), never the Python objects.
    settings, prints = json.loads(json.dumps(settings)), json.loads(json.dumps(prints))
    run_info = {"source": str(Path(source_root).resolve()), "config": settings,
                "fingerprint": prints}
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("config") != settings or previous.get("source") != run_info["source"]:
            raise ConfigurationError(
                f"{out}: the interrupted run used other settings or another input "
                f"({previous.get('source')}); resume with the same ones, or --overwrite")
        if previous.get("fingerprint") != prints:
            raise FormatError(f"{out}: the input files changed since the interrupted run started; "
                              "start again with --overwrite")
    else:
        atomic_write_text(run_file, json.dumps(run_info, indent=2))
