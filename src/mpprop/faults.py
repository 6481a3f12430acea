"""Process faults: pause points that crash tests kill at, SIGTERM as an exception, and MLflow
runs whose process died.

Pause points: `pause_point("fetch.before_swap")` does nothing unless the environment asks
for it (MPPROP_PAUSE_AT=<name>); then the process writes MPPROP_PAUSE_FILE (if set) and sleeps
until it is killed, so a test can kill a command at a chosen point, never by timing luck.

MLflow runs: an exception or a signal (SIGTERM, Ctrl-C) ends a run FAILED or KILLED, but a
kill -9 leaves it RUNNING for ever. Each run is therefore tagged with its host and process
(`process_tags`), and the next command that opens the store ends the runs of dead processes
on this host as KILLED, whatever their kind (`tracking.end_orphaned_runs`, called once per
process by `tracking.setup_mlflow` / `open_store`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PAUSE_AT_ENV = "MPPROP_PAUSE_AT"
PAUSE_FILE_ENV = "MPPROP_PAUSE_FILE"

HOST_TAG = "mpprop.host"
PID_TAG = "mpprop.pid"
PID_START_TAG = "mpprop.pid_start"  # the process's start time: a reused pid is not the same


def pause_point(name: str) -> None:
    """Sleep here until killed when MPPROP_PAUSE_AT names this point (crash tests only)."""
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {name}\n")
    while True:
        time.sleep(3600)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it unwinds like Ctrl-C, so `with` blocks clean up
    (temp folders removed, MLflow runs ended KILLED) before the process exits."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (main thread only; elsewhere the
    signal is left alone). The previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def process_start_time(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/<pid>/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether process `pid` of this host still runs (and, given its start time, is the same
    process rather than a later one that got the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False
    return True


def process_tags() -> dict[str, str]:
    """Tags that name this process: host, pid and the pid's start time."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = process_start_time(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


