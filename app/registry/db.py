"""The connection: opening it, migrating old databases, transactions, and the hot path's
precompiled SQL.

Nothing awaits inside a transaction: registry functions are synchronous and short, so the one
connection the event loop uses is never shared by two coroutines mid-transaction.
"""

from __future__ import annotations

import contextvars
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import peewee as pw
from playhouse.shortcuts import ReconnectMixin

from app.registry import walstamp
from app.registry.models import MODELS, Engine, Event, IdCounter, Product, RateLimit, db

# Set by the API for each request, so audit events name the request that caused them.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def connect(url: str, timeout: float = 5.0) -> pw.Database:
    database: pw.Database
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
        database = pw.SqliteDatabase(
            str(path),
            # No autocheckpoint: the write that crossed its threshold would copy the WAL and
            # fsync on the event loop (2-25 ms, every few seconds under load). The reconciler
            # calls checkpoint() from a thread instead.
            pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1,
                     "busy_timeout": int(timeout * 1000), "wal_autocheckpoint": 0},
            timeout=timeout,
        )
    else:
        database = _postgres(url.replace("postgres://", "postgresql://", 1), timeout)
    db.initialize(database)
    database.connect(reuse_if_open=True)
    _migrate(cast(Any, database))
    database.create_tables(MODELS, safe=True)
    _seed_ids()
    return database


def _migrate(database: Any) -> None:
    """Bring a database made by an older version up to date (idempotent)."""
    if "engine" in database.get_tables():
        columns = {c.name for c in database.get_columns("engine")}
        if "version" in columns and "row_version" not in columns:  # the column's old name
            database.execute_sql('ALTER TABLE "engine" RENAME COLUMN "version" TO "row_version"')
        if "previous_version" not in columns:  # upgrades' rollback target
            database.execute_sql('ALTER TABLE "engine" ADD COLUMN "previous_version" VARCHAR(256)')
        if "in_pool" not in columns:  # the warm pool
            database.execute_sql('ALTER TABLE "engine" ADD COLUMN "in_pool" BOOLEAN NOT NULL DEFAULT FALSE')
            database.execute_sql('ALTER TABLE "engine" ADD COLUMN "claimed_at" DOUBLE PRECISION')
    if "product" in database.get_tables() and \
            "warm_pool" not in {c.name for c in database.get_columns("product")}:
        database.execute_sql('ALTER TABLE "product" ADD COLUMN "warm_pool" INTEGER NOT NULL DEFAULT 0')
    if "event" in database.get_tables() and \
            "engine_id" not in {c.name for c in database.get_columns("event")}:
        database.execute_sql('ALTER TABLE "event" ADD COLUMN "engine_id" INTEGER')


def _seed_ids() -> None:
    """Start the id counters past every id ever used, including those of deleted
    products and engines that only their audit events (and rate-limit rows) remember."""
    highest: dict[str, Callable[[], int]] = {
        "product": lambda: max(Product.select(pw.fn.MAX(Product.id)).scalar() or 0,
                               Event.select(pw.fn.MAX(Event.product_id)).scalar() or 0,
                               RateLimit.select(pw.fn.MAX(RateLimit.product_id)).scalar() or 0),
        "engine": lambda: max(Engine.select(pw.fn.MAX(Engine.id)).scalar() or 0,
                              Event.select(pw.fn.MAX(Event.engine_id)).scalar() or 0),
    }
    with write_lock():
        for table, used in highest.items():
            if IdCounter.get_or_none(IdCounter.name == table) is None:
                IdCounter.insert(name=table, value=used()).on_conflict_ignore().execute()


def next_id(model: type[pw.Model]) -> int:
    """One past the highest id the model's table ever gave out, like SQLite's AUTOINCREMENT on
    any database (call it inside the insert's transaction; the UPDATE locks the counter row
    on PostgreSQL)."""
    table = model._meta.table_name
    IdCounter.update(value=IdCounter.value + 1).where(IdCounter.name == table).execute()
    row = IdCounter.get_or_none(IdCounter.name == table)
    if row is None:  # connect() seeds every counter; keep ids unique all the same
        top = int(model.select(pw.fn.MAX(model._meta.primary_key)).scalar() or 0)
        IdCounter.create(name=table, value=top + 1)
        return top + 1
    return int(row.value)


class _ReconnectingPostgres(ReconnectMixin, pw.PostgresqlDatabase):
    """Reconnects once when the server went away between two queries (a restart, a failover)."""


def _postgres(url: str, timeout: float) -> pw.Database:
    parsed = urlparse(url)
    ms = int(timeout * 1000)
    database: pw.Database = _ReconnectingPostgres(  # type: ignore[no-untyped-call]
        parsed.path.lstrip("/") or "postgres", user=unquote(parsed.username or "") or None,
        password=unquote(parsed.password or "") or None, host=parsed.hostname or None,
        port=parsed.port or None, connect_timeout=max(1, int(timeout)),
        # Waiting on a lock is bounded like SQLite's busy timeout: 503, not a hung request.
        options=f"-c lock_timeout={ms} -c statement_timeout={ms * 2}")
    return database


def tuples(query: Any) -> list[tuple[Any, ...]]:
    """A query's rows as plain tuples (typed: peewee's stubs call them model instances)."""
    return list(query.tuples())


def write_lock() -> Any:
    """A transaction that serialises writers: IMMEDIATE on SQLite (PostgreSQL locks rows)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def is_sqlite() -> bool:
    return isinstance(db.obj, pw.SqliteDatabase)


def checkpoint() -> None:
    """Copy SQLite's WAL into the database file, on a connection of its own (call it from a
    thread: it ends with an fsync). PASSIVE: it never waits for, or blocks, a writer."""
    database = db.obj
    if isinstance(database, pw.SqliteDatabase) and database.database != ":memory:":
        conn = sqlite3.connect(database.database, timeout=1.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()


CHECKPOINT_BYTES = 1 << 20  # a WAL this big is copied at the next tick
CHECKPOINT_S = 30.0  # a smaller one that changed, this often


def checkpoint_due(now: float | None = None) -> bool:
    """Is there something to copy from SQLite's WAL, and enough of it? Asked on the
    event loop (one stat): a WAL written since the last checkpoint is due once it holds
    CHECKPOINT_BYTES, or CHECKPOINT_S after that checkpoint. At rest the shard heartbeats
    write a few pages every few seconds: copying them each time would cost a connection, a
    copy and an fsync apiece. False on PostgreSQL, where checkpoint() has nothing to do."""
    database = db.obj
    if not isinstance(database, pw.SqliteDatabase) or database.database == ":memory:":
        return False
    path = database.database
    try:
        st = Path(path + "-wal").stat()
    except FileNotFoundError:
        return False  # no WAL: nothing to copy
    seen = (st.st_ino, st.st_size, st.st_mtime_ns)
    now = time.monotonic() if now is None else now
    last_seen, last_at = _last_wal.get(path, (None, float("-inf")))
    if seen == last_seen or (st.st_size < CHECKPOINT_BYTES and now - last_at < CHECKPOINT_S):
        return False
    _last_wal[path] = (seen, now)
    return True


# database -> its WAL's (inode, size, mtime) when a checkpoint was last due, and when
_last_wal: dict[str, tuple[tuple[int, int, int], float]] = {}


class Changes:
    """Has the database changed since this watcher last asked? The loops that poll
    the registry at rest (the reconciler's tick, the rollout poll) skip their queries when
    nothing was committed anywhere since their last look; each loop holds its own watcher.
    SQLite answers from the WAL-index header (app.registry.walstamp: no query, no system
    call), which every commit by any connection moves. PostgreSQL has no such thing: there
    the answer is always yes, and the loops query every time."""

    def __init__(self) -> None:
        self._seen: bytes | None = None

    def since_last_look(self) -> bool:
        stamp = walstamp.stamp()
        if stamp is None or stamp != self._seen:
            self._seen = stamp
            return True
        return False


# ---- the hot path's SQL ------------------------------------------------------------------------

_exception_wrapper = pw.__exception_wrapper__  # type: ignore[attr-defined]  # sqlite3 errors -> peewee's
_HOT: dict[tuple[str, int], str] = {}


def execute_hot(sql: str, params: tuple[Any, ...]) -> Any:
    """db.execute_sql minus peewee's per-call layers (proxy, logging, hooks) where that is all
    it does: an open SQLite connection in autocommit (peewee opens transactions explicitly),
    same statement, same error translation. PostgreSQL (reconnects) and the rest take
    execute_sql itself."""
    database: Any = db.obj
    if type(database) is pw.SqliteDatabase:
        state: Any = getattr(database, "_state")  # noqa: B009 - private to peewee, untyped
        if not state.closed and not getattr(database, "query_hooks", None):
            with _exception_wrapper:
                return state.conn.execute(sql, params)
    return database.execute_sql(sql, params)


def hot_sql(name: str, build: Callable[[str], str]) -> str:
    """SQL written once per database instead of built by the query builder on every call
    (building it cost more than running it). `build` gets the parameter placeholder."""
    key = (name, id(db.obj))
    sql = _HOT.get(key)
    if sql is None:
        sql = _HOT[key] = build(db.obj.param)
    return sql
