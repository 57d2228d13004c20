"""The multi-user database: users and their tier, API keys (hashes only), and minutes used per UTC day.

SQLite by default (a file in the data folder, created on first use); PostgreSQL when ``database_url`` says
so (needs the ``postgres`` extra: psycopg). Both speak the same SQL; the schema is versioned by the
migrations below and a one-row ``schema_version`` table. Calls are synchronous and short: the server runs
them in worker threads.

Every thread has a connection of its own, and SQLite runs in WAL mode (set when the file is opened; it stays
with the file), so a read never waits for a write, neither another thread's nor another process's. A write
waits at most ``BUSY_TIMEOUT_SECONDS`` for another writer's lock, then fails: the usage flusher keeps its
seconds and tries again later. PostgreSQL gets the same shape: a connection per thread, and that wait as
its ``lock_timeout``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from streamscribe.config import Settings

# Each migration is applied once, in order, in one transaction; never edit one that has shipped.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE users (
            user_id TEXT PRIMARY KEY,
            tier TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users (user_id),
            key_hash TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX api_keys_user ON api_keys (user_id)",
        """CREATE TABLE usage_daily (
            user_id TEXT NOT NULL,
            day TEXT NOT NULL,
            seconds DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (user_id, day)
        )""",
    ],
]


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored: never the key itself, only its hash.

    Attributes:
        key_id: The public part of the key (it is written into the key), used to find the row.
        user_id: The user the key belongs to; quotas count per user.
        tier: The user's tier (free, standard, premium).
        scope: ``stream`` (stream and read limits) or ``limits`` (read limits only).
        expires_at: Unix time after which the key is refused, or None.
        revoked_at: Unix time the key was revoked, or None.
    """

    key_id: str
    user_id: str
    tier: str
    scope: str
    key_hash: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def is_usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


# How long a write waits for another connection's lock before it fails (SQLite's busy timeout, PostgreSQL's
# lock_timeout). Short: the usage flusher retries, and a CLI command says so; nothing waits behind it.
BUSY_TIMEOUT_SECONDS = 1.0
# Migrations run once at start-up, while other replicas may be migrating or writing: they may wait longer.
MIGRATION_WAIT_SECONDS = 30.0


class StoreBusy(Exception):
    """A write gave up waiting for another connection's lock (SQLite busy, PostgreSQL lock_timeout)."""


def _is_busy(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return getattr(exc, "sqlstate", None) == "55P03"  # PostgreSQL: lock_not_available


class _Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class KeyStore:
    """Users, keys and daily usage in a SQL database. Thread-safe: a connection per thread, no lock shared
    between them, so one thread's wait for the database never holds up another thread's query."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._postgres = url.startswith(("postgres://", "postgresql://"))
        if not self._postgres:
            if not url.startswith("sqlite:///"):
                raise ValueError("database_url must start with sqlite:/// or postgresql://")
            self._path = Path(url.removeprefix("sqlite:///"))
            # Hashes and usage are the server's alone, whatever the umask: SQLite gives its -wal and -shm
            # files the database file's permissions.
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Only a new file: closing any descriptor of a file drops every POSIX lock this process's
            # SQLite connections hold on it.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._connections_lock = threading.Lock()  # guards the list only; never held across a query
        self._migrate()

    def _connection(self) -> _Connection:
        """This thread's connection, opened on its first call."""
        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect(BUSY_TIMEOUT_SECONDS)
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _connect(self, busy_timeout: float) -> _Connection:
        """A new connection whose writes wait at most ``busy_timeout`` seconds for another's lock."""
        if self._postgres:
            try:
                import psycopg
            except ImportError:
                raise RuntimeError(
                    "a PostgreSQL database_url needs psycopg: pip install 'streamscribe[postgres]'"
                ) from None
            postgres = psycopg.connect(self.url)
            postgres.execute(f"SET lock_timeout = {int(busy_timeout * 1000)}")
            postgres.commit()
            return postgres
        # check_same_thread=False only so that close() may close every thread's connection.
        sqlite = sqlite3.connect(
            self._path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        # WAL: readers never wait for a writer (in rollback-journal mode a writer's EXCLUSIVE lock shuts them
        # all out). It stays with the file; on a file already in WAL mode this takes no lock.
        sqlite.execute("PRAGMA journal_mode=WAL")
        sqlite.execute("PRAGMA foreign_keys=ON")
        return _SqliteTransactions(sqlite)

    @contextmanager
    def _transaction(
        self, write: bool = False, connection: _Connection | None = None
    ) -> Iterator[_Connection]:
        """A transaction on ``connection`` (default: this thread's)."""
        if connection is None:
            connection = self._connection()
        try:
            if not self._postgres:
                # A writer takes SQLite's write lock up front, so two writers queue instead of deadlocking.
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield connection
        except BaseException as exc:
            connection.rollback()
            if _is_busy(exc):
                raise StoreBusy("the database is busy: another process holds its write lock") from exc
            raise
        connection.commit()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def _run(self, connection: _Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        return connection.execute(self._sql(sql), params)

    def _migrate(self) -> None:
        if self._version() == len(MIGRATIONS):
            return  # up to date: start without the write lock, which another process may be holding
        connection = self._connect(MIGRATION_WAIT_SECONDS)
        try:
            with self._transaction(write=True, connection=connection):
                if self._postgres:
                    # Two replicas starting together must not both migrate.
                    connection.execute("SELECT pg_advisory_xact_lock(5150412)")
                self._run(connection, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = self._run(connection, "SELECT version FROM schema_version").fetchone()
                version = row[0] if row else 0
                if row is None:
                    self._run(connection, "INSERT INTO schema_version (version) VALUES (0)")
                for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in statements:
                        self._run(connection, statement)
                    self._run(connection, "UPDATE schema_version SET version = ?", (number,))
        finally:
            connection.close()

    def _version(self) -> int | None:
        """The schema version, or None for a database without one yet."""
        with self._transaction() as connection:
            exists = self._run(
                connection,
                "SELECT to_regclass('schema_version')"
                if self._postgres
                else "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            ).fetchone()
            if exists is None or exists[0] is None:
                return None
            row = self._run(connection, "SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else None

    @property
    def schema_version(self) -> int:
        return self._version() or 0

    def add_key(
        self, key_id: str, user_id: str, key_hash: str, tier: str | None, scope: str, expires_at: float | None
    ) -> KeyRecord:
        """Store a new key; creates the user (tier ``free`` unless given) or updates its tier when given."""
        now = time.time()
        with self._transaction(write=True) as connection:
            existing = self._run(connection, "SELECT tier FROM users WHERE user_id = ?", (user_id,))
            if existing.fetchone() is None:
                self._run(
                    connection,
                    "INSERT INTO users (user_id, tier, created_at) VALUES (?, ?, ?)",
                    (user_id, tier or "free", now),
                )
            elif tier is not None:
                self._run(connection, "UPDATE users SET tier = ? WHERE user_id = ?", (tier, user_id))
            self._run(
                connection,
                "INSERT INTO api_keys (key_id, user_id, key_hash, scope, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, user_id, key_hash, scope, now, expires_at),
            )
        record = self.find_key(key_id)
        assert record is not None
        return record

    _KEY_COLUMNS = (
        "k.key_id, k.user_id, u.tier, k.scope, k.key_hash, k.created_at, k.expires_at, k.revoked_at "
        "FROM api_keys k JOIN users u ON u.user_id = k.user_id"
    )

    def find_key(self, key_id: str) -> KeyRecord | None:
        with self._transaction() as connection:
            cursor = self._run(connection, f"SELECT {self._KEY_COLUMNS} WHERE k.key_id = ?", (key_id,))
            row = cursor.fetchone()
        return KeyRecord(*row) if row else None

    def list_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        query = f"SELECT {self._KEY_COLUMNS}"
        params: tuple[str, ...] = ()
        if user_id is not None:
            query += " WHERE k.user_id = ?"
            params = (user_id,)
        with self._transaction() as connection:
            rows = self._run(connection, query + " ORDER BY k.created_at", params).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._transaction(write=True) as connection:
            cursor = self._run(
                connection,
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            return bool(cursor.rowcount)

    def set_tier(self, user_id: str, tier: str) -> bool:
        with self._transaction(write=True) as connection:
            cursor = self._run(connection, "UPDATE users SET tier = ? WHERE user_id = ?", (tier, user_id))
            return bool(cursor.rowcount)

    def add_usage(self, seconds_by_user_day: Mapping[tuple[str, str], float]) -> None:
        """Add seconds of audio to each (user, UTC day)."""
        with self._transaction(write=True) as connection:
            for (user_id, day), seconds in seconds_by_user_day.items():
                self._run(
                    connection,
                    "INSERT INTO usage_daily (user_id, day, seconds) VALUES (?, ?, ?) "
                    "ON CONFLICT (user_id, day) "
                    "DO UPDATE SET seconds = usage_daily.seconds + excluded.seconds",
                    (user_id, day, seconds),
                )

    def usage_seconds(self, user_id: str, day: str) -> float:
        with self._transaction() as connection:
            row = self._run(
                connection, "SELECT seconds FROM usage_daily WHERE user_id = ? AND day = ?", (user_id, day)
            ).fetchone()
        return float(row[0]) if row else 0.0

    def close(self) -> None:
        """Close every thread's connection; a thread that calls the store afterwards opens a new one."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()


class _SqliteTransactions:
    """sqlite3 in autocommit mode, transactions begun explicitly by KeyStore."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._connection.execute(sql, params)

    def commit(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("COMMIT")

    def rollback(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")

    def close(self) -> None:
        self._connection.close()


def database_url(settings: Settings) -> str:
    """The configured database, or the SQLite file in the data folder."""
    return settings.database_url or f"sqlite:///{settings.data_dir / 'streamscribe.db'}"


def open_store(settings: Settings) -> KeyStore:
    return KeyStore(database_url(settings))
