"""File-system rules every reader and writer follows: atomic writes, what an
OSError becomes, and where a path may lead (symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ArrowQuantIOError


def fresh(path: Path) -> Path:
    """`path`, with whatever was there (a stale temporary, or a symlink
    planted in its place) removed without following it, so that the file
    created next is a new one: a write never goes through a symlink."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place
    (fsynced first): a reader sees the old file or the whole new one."""
    tmp = fresh(path.with_name(path.name + ".tmp"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def io_error(exc: OSError, what: str) -> ArrowQuantIOError:
    """The error a failed write during a run becomes: it names the file and
    the cause, and says the run can be resumed."""
    return ArrowQuantIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno}); the staging "
                             "folder is kept, so `--resume` can finish the run after the cause is "
                             "fixed")


def is_inside(root: Path, p: Path) -> bool:
    """Whether `p`, symlinks resolved, lies inside `root`."""
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def check_separate(src: Path, out: Path) -> None:
    """Refuses an output that is the input, lies inside it or contains it
    (symlinks resolved): a run must never write into, or delete, its input."""
    from .errors import ConfigurationError
    from .text import printable

    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if s == o:
        raise ConfigurationError(f"{printable(out)}: the output is the input; choose another "
                                 "output path")
    if s in o.parents:
        raise ConfigurationError(f"{printable(out)}: the output lies inside the input "
                                 f"{printable(src)}; choose a path outside it")
    if o in s.parents:
        raise ConfigurationError(f"{printable(out)}: the output contains the input "
                                 f"{printable(src)}; choose another output path")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, final_name: str) -> None:
    """Removes the temporary files an earlier, killed writer of `final_name`
    left in `folder` (`.NAME.PID.HEX.tmp` of the SafeTensors writer,
    `NAME.tmp-PID` of the GGUF writer), when process PID no longer runs."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        pid = None
        if e.name.startswith(f".{final_name}.") and e.name.endswith(".tmp"):
            parts = e.name[len(final_name) + 2:-4].split(".")
            pid = parts[0] if len(parts) == 2 else None
        elif e.name.startswith(f"{final_name}.tmp-"):
            pid = e.name[len(final_name) + 5:]
        if pid is None or not pid.isdigit() or pid_alive(int(pid)) or \
                not e.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(e.path)
        except OSError:
            pass


def allowed_root(root: Path) -> Path:
    """The directory every file of a model folder must resolve into (the one
    rule for symlinks): the folder itself, or, inside a Hugging Face cache
    snapshot (.../models--x--y/snapshots/<rev>/...), whose files are symlinks
    to ../../blobs/<hash>, the repository's cache folder."""
    real = Path(os.path.realpath(root))
    for a in (real, *real.parents):
        if a.parent.name == "snapshots":
            return a.parent.parent
    return real


def check_inside(root: Path, path: Path, what: str = "file") -> Path:
    """`path` if, symlinks resolved, it lies inside allowed_root(root); else
    a FormatError naming it (a symlink leading out of the model folder is
    never followed: not for shards, components, copied files)."""
    from .errors import FormatError
    from .text import printable

    allowed = allowed_root(root)
    real = Path(os.path.realpath(path))
    if real != allowed and allowed not in real.parents:
        raise FormatError(f"{printable(path)}: this {what} resolves to {printable(real)}, outside "
                          f"the model folder {printable(allowed)} (a symlink that leads out of it "
                          "is not followed)")
    return path


def save_traceback(exc: BaseException) -> str:
    """Writes the full traceback of an unexpected exception to a file in the
    temporary directory and returns its path (what the CLI prints instead of
    the traceback)."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    fd, path = tempfile.mkstemp(prefix=f"arrowquant-crash-{time.strftime('%Y%m%d-%H%M%S')}-",
                                suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    return path
