"""Read-only checks of a database file for `wxd doctor`: can it be written, is it intact, which
schema version it has. Synchronous sqlite3; imports wxd.store.schema only.

Safe beside a running daemon: no lock file is taken, and the write test is a BEGIN IMMEDIATE
that is rolled back (it waits, like the daemon's own writes, for at most the busy timeout).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass

from wxd.store.schema import MIGRATIONS

BUSY_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class DatabaseReport:
    """What a check of the file at `path` found. `error` says why it cannot be written (None
    when it can); `integrity` is PRAGMA integrity_check's first line ("ok" when intact) and
    `version` PRAGMA user_version, both None when the file could not be read (`read_error`
    says why: a file that cannot be opened is not thereby damaged)."""

    path: str
    exists: bool
    error: str | None
    integrity: str | None = None
    version: int | None = None
    read_error: str | None = None
    current: int = len(MIGRATIONS)


def _directory_error(directory: str) -> str | None:
    """Why no file can be created in `directory`, or None (tried for real: permission bits say
    nothing for root, nor for a read-only or immutable file system)."""
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".wxd-doctor-"):
            pass
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror or exc}"
    return None


def check_database(path: str) -> DatabaseReport:
    """Check the database at `path` without changing it (see the module docstring)."""
    if path == ":memory:":
        return DatabaseReport(path, False, None, "ok", 0)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        return DatabaseReport(path, False, _directory_error(directory))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        return DatabaseReport(path, True, f"cannot open it for writing: {exc}",
                              read_error=str(exc))
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            error = _directory_error(directory)  # the -wal and -shm files are created beside it
        except sqlite3.OperationalError as exc:
            error = f"cannot write to it: {exc}"
        except sqlite3.DatabaseError:  # damaged: the integrity line says so
            error = _directory_error(directory)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        except sqlite3.OperationalError as exc:  # cannot be opened (e.g. no -shm can be made)
            return DatabaseReport(path, True, error, read_error=str(exc))
        except sqlite3.DatabaseError as exc:  # not a database, or damaged beyond reading
            return DatabaseReport(path, True, error, str(exc))
    finally:
        conn.close()
    return DatabaseReport(path, True, error, integrity, version)
