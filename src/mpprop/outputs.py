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
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from mpprop.faults import pause_point
from mpprop.write_errors import writing

LOCK_SUFFIX = ".mpprop-output.lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputBusyError(RuntimeError):
    """Another process writes this output now (the CLI reports it in one line, exit code 1)."""


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
