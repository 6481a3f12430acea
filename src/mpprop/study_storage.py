"""Where an Optuna study lives: its storage URL (checked, password masked in logs), the RDB
storage with heartbeats, and the inter-process lock that lives in the same database, so that
workers on several hosts agree on who creates the study and who starts the next trial.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from mpprop.config import Params

_ERROR_CHARS = 500  # a storage error is one line for the eye, not a traceback


class TuneError(RuntimeError):
    """A study that cannot be run as asked."""


class StudyStorageError(TuneError):
    """An Optuna storage that cannot be used (a TuneError, so `mpprop tune` reports it)."""


def redact(url: str) -> str:
    """A storage URL fit for logs: the password (if any) is masked."""

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show it as given
        return url


class StorageLock:
    """An inter-process lock that lives where the study lives, so it spans hosts.

    PostgreSQL: a session advisory lock (released by the server if the worker dies).
    SQLite: an flock on a file beside the database (released by the kernel likewise).
    Other back-ends: no lock; workers may then overshoot the target by a trial or two.
    acquire/release are idempotent, so a holder may release early (see the objective).
    """

    def __init__(self, url: str, name: str) -> None:

        self.name = name
        self._url = make_url(url)
        self._key = int.from_bytes(
            hashlib.sha256(name.encode()).digest()[:8], "big", signed=True
        )
        self._conn: Any = None
        self._fh: Any = None
        self._engine: Any = None
        backend = self._url.get_backend_name()
        self.kind = {"postgresql": "postgresql", "sqlite": "sqlite"}.get(backend, "none")
        if self.kind == "sqlite" and not self._url.database:
            self.kind = "none"  # in-memory SQLite: one process anyway

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fh is not None

    def acquire(self) -> None:
        if self.held or self.kind == "none":
            return
        if self.kind == "sqlite":
            safe = re.sub(r"[^\w.-]", "_", self.name)  # study names may hold any character
            path = Path(f"{self._url.database}.{safe}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 - held open while the lock is held
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._fh = fh
            return

        if self._engine is None:
            self._engine = create_engine(self._url, poolclass=NullPool)
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self._conn = conn

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        if self._conn is not None:
            from sqlalchemy import text

            conn, self._conn = self._conn, None
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            finally:
                conn.close()  # closing the session frees the lock in any case

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def dispose(self) -> None:
        self.release()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


STORAGE_CONNECT_TIMEOUT = 10  # seconds for the check of a PostgreSQL storage URL


def _storage_error(url: str, err: BaseException) -> StudyStorageError:
    """One line naming the storage (password masked) and why it cannot be used."""

    cause = getattr(err, "orig", None) or err  # a DBAPIError wraps the driver's error
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", str(cause))
    text = " ".join(text.split())[:_ERROR_CHARS]  # one line
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
        password = None
    if password:
        text = text.replace(str(password), "***")
    return StudyStorageError(
        f"cannot use Optuna storage {redact(url)}: {type(cause).__name__}: {text or '?'}"
    )


def storage_url(url: str, check: bool = True) -> str:
    """The storage URL to use, checked: a TuneError naming it if it cannot be used.

    `postgresql://` gets a driver that is installed: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3; where only psycopg2 is installed, it is named, so plain
    URLs work. With `check`, the URL must parse, name a database kind SQLAlchemy has a driver
    for, and accept a connection (PostgreSQL within STORAGE_CONNECT_TIMEOUT), so that a bad
    `--storage` is one line instead of a traceback from deep inside SQLAlchemy.
    """

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - any URL SQLAlchemy cannot read
        raise _storage_error(url, err) from err
    if parsed.drivername == "postgresql":

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg2")
            url = parsed.render_as_string(hide_password=False)
    if check:

        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = STORAGE_CONNECT_TIMEOUT
        try:
            engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
            try:
                engine.connect().close()
            finally:
                engine.dispose()
        except Exception as err:  # noqa: BLE001 - unknown dialect, no driver, no server...
            raise _storage_error(url, err) from err
    return url


def study_storage(params: Params, prop: str, override: str | None = None) -> str:
    """The study's storage URL: `--storage` or `tune.storage`, `{property}` filled in; the
    folder of a SQLite file is made."""
    url = params.optuna_storage(override).replace("{property}", prop)
    prefix = "sqlite:///"
    if url.startswith(prefix):
        Path(url[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def open_storage(
    params: Params, url: str, stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None
) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a worker silent for grace_period has its trial failed."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=params.tune.heartbeat_interval,
                grace_period=params.tune.grace_period,
                heartbeat_stale_trial_callback=stale_callback,
            )
    # RuntimeError: e.g. Optuna's "incompatible with the table schema" of an older study
    except (SQLAlchemyError, ImportError, OSError, RuntimeError, ValueError) as err:
        raise _storage_error(url, err) from err
