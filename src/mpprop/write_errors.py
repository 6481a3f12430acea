"""Failed writes as typed errors that name the file and the cause ("disk full while writing
<path>"), which the CLI prints in one line. Standard library only: the training core (torch
and numpy, nothing else) writes its checkpoints through `writing`.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class ProjectFileError(RuntimeError):
    """A file of the project that cannot be read or written (a full disk, a corrupt tracking
    database): the CLI reports it in one line, exit code 1."""


class WriteError(ProjectFileError):
    """A file that could not be written: read-only file system, no permission, ..."""


class DiskFullError(WriteError):
    """No space left (or the quota is used up) while writing a file."""


# errno of a failed write -> why, in the message; ENOSPC and EDQUOT are a full disk
_WRITE_ERRNOS = {
    errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.EFBIG: "file too large",
}
# where the failing call is the write itself (creating the file), not code inside the block
_PERMISSION_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
# torch.save's C++ writer reports a failed write (ENOSPC included) as a RuntimeError, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|failed writing|file write failed")
LOW_SPACE_BYTES = 1 << 20  # less than this free beside a failed torch.save: the disk is full


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of `path` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(exc: BaseException, path: str | Path,
                permission: bool = False) -> WriteError | None:
    """The WriteError that `exc`, raised while writing `path`, stands for (None: `exc` is not
    a failed write). `permission`: EACCES / EPERM count too (the failing call created the
    file; inside a block they could come from reading an input)."""
    if isinstance(exc, ProjectFileError):
        return None  # already says which file
    if isinstance(exc, OSError):
        why = _WRITE_ERRNOS.get(exc.errno) or (
            _PERMISSION_ERRNOS.get(exc.errno) if permission else None)
        if why is None:
            return None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"{why} while writing {path}")
        return WriteError(f"cannot write {path}: {why}")
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        free = free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            return DiskFullError(f"disk full while writing {path}")
        return WriteError(f"cannot write {path}: {str(exc).strip().splitlines()[0]}")
    return None


@contextlib.contextmanager
def writing(path: str | Path, permission: bool = False) -> Iterator[None]:
    """Inside the block, a failed write (write_error) becomes a WriteError naming `path`."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        err = write_error(exc, path, permission)
        if err is None:
            raise
        raise err from exc
