"""The output directory while a run writes it: the lock, the staging folder
with one part file per finished chunk (what makes `--resume` redo only the
unfinished chunks, to the same bytes), and the run.json that says which
settings and inputs the staged parts belong to."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ArrowQuantError, ConfigurationError, FormatError
from ..files import atomic_write_text, io_error
from ..formats.v2_schema import ChunkRecord

STAGING = ".arrowquant-staging"
LOCK_NAME = ".arrowquant.lock"


class OutputLock:
    """An exclusive flock on OUTPUT/.arrowquant.lock. The kernel drops it when
    the process dies, so a crashed run never leaves it stuck."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        with open(tmp, "wb") as f:
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


def prepare_output(out: Path, overwrite: bool, resume: bool, check_only: bool = False) -> None:
    """Refuses an output that exists (unless overwrite / resume allow it) and,
    unless check_only, empties it for --overwrite and creates it."""
    if out.exists() and not out.is_dir():
        raise ArrowQuantError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        ours = (out / "metadata.json").exists() or (out / STAGING).exists() or \
            (out / LOCK_NAME).exists()
        if resume:
            if not (out / STAGING).exists():
                raise ArrowQuantError(f"{out}: exists but holds no interrupted ArrowQuant run to "
                                      "resume")
            return
        if not overwrite:
            raise ArrowQuantError(f"{out}: already exists; pass --overwrite to replace it or "
                                  "--resume to finish an interrupted run")
        if not ours:
            raise ArrowQuantError(f"{out}: exists and does not look like ArrowQuant output; "
                                  "refusing to delete it (choose another output path)")
        if check_only:
            return
        lock = OutputLock(out)
        lock.acquire()  # refuse to delete what a live run is writing
        try:
            for child in out.iterdir():
                if child.name == LOCK_NAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        finally:
            lock.release()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


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
