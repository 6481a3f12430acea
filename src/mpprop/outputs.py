"""Stage outputs written as units: after a kill -9 at any moment the previous complete output
is intact, and nothing half-written is ever read as complete.

`output_dir(target, what)` is how a stage writes a folder (the snapshot, a graph-cache key,
a model folder, a plots folder):

1. it takes a non-blocking lock beside the folder, `.<name>.mpprop-output.lock` (the lock
   files stay; the name matches the `*.mpprop-*.lock` pattern of .gitignore): a second writer
   of the same folder fails at once with `OutputBusyError` instead of mixing its files in;
2. holding the lock, it removes what killed writers left: temp folders `.<name>.tmp-*`
   (no other writer can own one while we hold the lock) and `.<name>.old-*` (see 5);
3. it yields a fresh temp folder `.<name>.tmp-<pid>-<random>` in the same parent, with the
   mode a new folder gets under the umask (not mkdtemp's 0700);
4. when the block succeeds, it fsyncs the files and swaps the temp folder with the target in
   one step, renameat2(RENAME_EXCHANGE) (Linux >= 3.15), then removes the old contents (now
   under the temp name); a new target is a plain rename. When the block fails, or the process
   is stopped by a signal, the temp folder is removed and the target is untouched;
5. where RENAME_EXCHANGE is unavailable (another OS, a filesystem without it) the target is
   renamed aside to `.<name>.old-<pid>-<random>`, the new folder renamed in, the old one
   removed. A kill between the two renames leaves no target but a complete old folder:
   readers go through `readable_dir`, which falls back to it, and the next writer renames
   it back before anything else.

Single files use snapshot.atomic_output (temp file + rename).

Both turn a failed write (disk full, quota, read-only file system) into a `WriteError` naming
the file the user knows (the target, not the temp name), which the CLI reports in one line;
`writing(path)` does the same around any other write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from mpprop.faults import pause_point

LOCK_SUFFIX = ".mpprop-output.lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputBusyError(RuntimeError):
    """Another process writes this output now (the CLI reports it in one line, exit code 1)."""


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


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _old_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def default_dir_mode() -> int:
    """The mode a newly created folder gets under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _load_renameat2():  # noqa: ANN202 - a ctypes function or None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the OS or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _leftovers(target: Path, prefix: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    return sorted((p for p in target.parent.iterdir() if p.name.startswith(prefix)),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def readable_dir(target: str | Path) -> Path:
    """The folder to read `target` from: itself, or, if a writer without RENAME_EXCHANGE was
    killed between its two renames, the complete old folder it had set aside."""
    target = Path(target)
    if target.exists():
        return target
    old = _leftovers(target, _old_prefix(target))
    return old[0] if old else target


def _recover(target: Path) -> None:
    """Under the lock: restore or drop what killed writers left beside `target`."""
    old = _leftovers(target, _old_prefix(target))
    if old and not target.exists():
        os.rename(old.pop(0), target)
    for path in old + _leftovers(target, _tmp_prefix(target)):
        _remove(path)


def _commit(tmp: Path, target: Path) -> None:
    fsync_tree(tmp)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif exchange(tmp, target):
        _remove(tmp)  # the old contents, now under the temp name
    else:
        old = target.parent / f"{_old_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_path(target.parent)
        _remove(old)
    _fsync_path(target.parent)


@contextlib.contextmanager
def output_dir(target: str | Path, what: str) -> Iterator[Path]:
    """A temp folder to write `target`'s new contents into, swapped in as a whole when the
    block succeeds (see the module's docstring). `what` names the writer in errors and its
    pause point (`<what>.before_swap`)."""
    target = Path(target)
    lock = FileLock(lock_path(target), blocking=False)
    try:
        with writing(target, permission=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
    except Timeout:
        raise OutputBusyError(
            f"{target} is being written by another `mpprop {what}` (it holds "
            f"{lock_path(target)}); wait for it to finish or stop it, then run again"
        ) from None
    try:
        with writing(target, permission=True):
            _recover(target)
            tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target)}{os.getpid()}-",
                                        dir=target.parent))
        try:
            # a write that fails in the block without naming its file names the folder
            with writing(target):
                os.chmod(tmp, default_dir_mode())
                yield tmp
                pause_point(f"{what}.before_swap")
                _commit(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
    finally:
        lock.release()
