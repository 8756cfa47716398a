"""Inter-process locks around creating a store's schema and around read-modify-write steps on it.

MLflow (alembic migrations) and Optuna (``create_all`` plus a version row) create their
schema on a process's first contact with a fresh database, in several transactions.
Two processes doing that at the same moment crash (``table latest_metrics already exists``,
``duplicate column name``, on PostgreSQL ``duplicate key value violates unique constraint
"pg_type_typname_nsp_index"``) and can leave a half-migrated database; and two ``pfl tune``
workers appending to a study's ``mlflow_study_run_ids`` at once can keep one of the two ids.
:func:`store_lock` makes pfl processes take turns: on a SQLite store an exclusive ``flock`` on
``<database file>.lock``; on a PostgreSQL database a session-level advisory lock (PostgreSQL
docs, "Advisory Locks", ``pg_advisory_lock``), held only for those steps, after which the
database's own locking serializes writes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; SQLite store creation there stays unserialized
    fcntl = None

# the advisory lock's key, a signed 64-bit integer: the same in every pfl process and version; advisory locks
# are per database, so it serializes pfl's steps within one database only
ADVISORY_KEY = int.from_bytes(hashlib.blake2b(b"pfl.store_lock", digest_size=8).digest(), "big", signed=True)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` SQLAlchemy URL (relative to the working directory when the URL is);
    ``None`` for other URLs and for in-memory databases."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # a malformed URL: let MLflow / Optuna report it
        return None
    if database and database.startswith("file:"):  # SQLite URI filenames: sqlite:///file:path?mode=...&uri=true
        database = database[5:].split("?", 1)[0]
    if not database or database == ":memory:" or database.startswith(":memory:"):
        return None
    return Path(database)


def is_postgresql(uri: str) -> bool:
    """Whether ``uri`` is a PostgreSQL SQLAlchemy URL, with or without a driver (``postgresql+psycopg2://``)."""
    return uri.startswith(("postgresql:", "postgresql+"))


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the store ``uri`` names; a no-op for other URLs (e.g. an MLflow server's).

    SQLite: a ``flock`` on ``<database file>.lock``. PostgreSQL: ``pg_advisory_lock(ADVISORY_KEY)`` on a
    connection of its own, unlocked and closed at the end (closing alone, or the process dying, releases it too).
    Blocks until the other holders are done. When the lock cannot be taken (the lock file's folder is missing or
    read-only; the database does not answer, refuses the login or lacks its driver), it proceeds unlocked and
    lets the store report the problem.
    """
    if is_postgresql(uri):
        with _advisory_lock(uri):
            yield
        return
    path = sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    """:func:`store_lock` for a PostgreSQL ``uri``: the session-level advisory lock on a connection of its own."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:  # autocommit: no transaction left idle while the lock is held
        connection = create_engine(uri, poolclass=NullPool, isolation_level="AUTOCOMMIT").connect()
    except Exception:
        connection = None
    if connection is None:
        yield
        return
    try:
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({ADVISORY_KEY})")
        yield
    finally:
        try:
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_KEY})")
        except Exception:
            pass  # a broken connection: the server released the lock with the session
        connection.close()  # NullPool: really closes it
