"""Shared pieces of the benchmarks: child-process measurement, machine facts, targets.

Only the standard library (and psutil, lazily) is imported here: the memory
benchmark's parent process must stay small, because on Linux a child's
`ru_maxrss` starts from the RSS high-water mark of the process it was forked
from (exec records the old address space's peak). The parent therefore never
loads numpy, pyarrow or the engine; every heavy step runs in a child.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1024.0 * 1024.0

# --- targets (issue 4) --------------------------------------------------------

#: native quantization memory / reference quantization memory, at most.
RATIO_TARGET = 0.25
#: reference time / native time, end to end, at least.
SPEEDUP_TARGET = 10.0
#: reference kernel time / engine kernel time, in-memory, at least.
KERNEL_SPEEDUP_TARGET = 30.0
#: native end-to-end time / pure I/O time, at most.
IO_BOUND_TARGET = 1.5
#: native end-to-end seconds, below, per size class.
TIME_TARGETS_S: Dict[str, float] = {"100M": 5.0, "600M": 20.0, "7B": 60.0}

PASS, FAIL, NA = "PASS", "FAIL", "n/a"


def mark(ok: Optional[bool]) -> str:
    if ok is None:
        return NA
    return PASS if ok else FAIL


# --- child processes ----------------------------------------------------------


def rss_mb() -> float:
    """Resident set size of this process now, from /proc (no psutil needed)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def vm_hwm_mb() -> Optional[float]:
    """Peak RSS of this process's current address space (VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


@dataclass
class ChildRun:
    returncode: int
    peak_rss_mb: float                # ru_maxrss from os.wait4
    wall_s: float
    timeline: List[Tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MB)
    parent_rss_mb: float = 0.0        # this process's RSS when the child started
    stderr: str = ""
    # Largest file-backed part of the RSS seen by the sampler (mapped files: page
    # cache the kernel can drop, unlike anonymous memory).
    sampled_file_backed_mb: float = 0.0


def _sample(pid: int, stop: threading.Event, interval: float, t0: float,
            out: List[Tuple[float, float]], shared: List[float]) -> None:
    try:
        import psutil
    except ImportError:
        return
    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            info = proc.memory_info()
            out.append((time.perf_counter() - t0, info.rss / MB))
            shared.append(getattr(info, "shared", 0) / MB)
            stop.wait(interval)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return


def run_child(cmd: Sequence[str], *, sample_interval: float = 0.02,
              env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> ChildRun:
    """Runs `cmd`, returns its true peak RSS (os.wait4) and an RSS timeline.

    stdout is inherited; stderr is captured into a temporary file (so a chatty
    child can never block on a full pipe) and returned.
    """
    import tempfile

    parent_rss = rss_mb()
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stderr=err, env=env)
        stop = threading.Event()
        timeline: List[Tuple[float, float]] = []
        shared: List[float] = []
        sampler = threading.Thread(target=_sample, args=(proc.pid, stop, sample_interval, t0, timeline, shared),
                                   daemon=True)
        sampler.start()
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        # Popen must not try to reap the pid again.
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return ChildRun(returncode=proc.returncode, peak_rss_mb=usage.ru_maxrss / 1024.0, wall_s=wall,
                    timeline=timeline, parent_rss_mb=parent_rss, stderr=stderr,
                    sampled_file_backed_mb=max(shared, default=0.0))


# --- machine and provenance ---------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024.0 / 1024.0, 1)
    except OSError:
        pass
    return None


def load_average() -> Optional[float]:
    """1-minute load average: above the core count, timings are contended."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> Dict[str, object]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": total_memory_gb(),
        "python": platform.python_version(),
        "load_average_1m": load_average(),
    }


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD commit, with '-dirty' when tracked files are modified; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions(names: Sequence[str] = ("numpy", "pyarrow", "psutil", "gguf", "matplotlib")
                     ) -> Dict[str, str]:
    """Installed versions, read from package metadata without importing the packages."""
    from importlib import metadata

    out: Dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def source_tree() -> Optional[Path]:
    """The repository's python/ directory when it holds a built extension, else None
    (then the installed arrowquant package is used)."""
    py = REPO_ROOT / "python"
    if any((py / "arrowquant").glob("_core*.so")) or any((py / "arrowquant").glob("_core*.pyd")):
        return py
    return None


def use_source_tree() -> None:
    """Makes `import arrowquant` in this process find the built source tree first."""
    py = source_tree()
    if py is not None and str(py) not in sys.path:
        sys.path.insert(0, str(py))


def child_env() -> Dict[str, str]:
    """Environment for children: the built python/ tree first on PYTHONPATH."""
    env = dict(os.environ)
    py = source_tree()
    if py is not None:
        env["PYTHONPATH"] = str(py) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def python_exe() -> str:
    return sys.executable
