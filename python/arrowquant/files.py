"""File-system rules every reader and writer follows: atomic writes, what an
OSError becomes, and where a path may lead (symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ArrowQuantIOError


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place
    (fsynced first): a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
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
