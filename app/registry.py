"""The registry: Peewee models and the only code that writes them.

The database is the single source of truth, shared by every replica. Rules that keep it so:
- every change of an engine's state is one compare-and-set on (id, version, status) plus one
  audit event, in one transaction (`transition`);
- nothing awaits inside a transaction: these functions are synchronous and short, so the one
  connection the event loop uses is never shared by two coroutines mid-transaction;
- timestamps are float epoch seconds, compared and stored the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import peewee as pw
from playhouse.shortcuts import ReconnectMixin

from app import metrics, states

db = pw.DatabaseProxy()
log = logging.getLogger("orch.transitions")

# Set by the API for each request, so audit events name the request that caused them.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Product(BaseModel):
    name = pw.CharField(max_length=32, unique=True)
    key_hash = pw.CharField(max_length=64, unique=True)
    max_engines = pw.IntegerField()
    rate_limit_rpm = pw.IntegerField()
    created_at = pw.DoubleField()


class RateLimit(BaseModel):
    """GCRA state of a product's admit limiter: the theoretical arrival time."""

    product_id = pw.IntegerField(primary_key=True)
    tat = pw.DoubleField(default=0.0)


class Engine(BaseModel):
    product = pw.ForeignKeyField(Product, backref="engines", on_delete="RESTRICT")
    user_id = pw.CharField(max_length=128)
    name = pw.CharField(max_length=63, unique=True)
    status = pw.CharField(max_length=16, index=True)
    version = pw.IntegerField(default=0)  # bumped by every write: the compare in compare-and-set
    engine_version = pw.CharField(max_length=256)
    url = pw.CharField(max_length=256, null=True)
    key_enc = pw.TextField()
    pending_key_enc = pw.TextField(null=True)  # a rotation in flight (see lifecycle.rotate_key)
    driver_state = pw.TextField(default="{}")
    restarts = pw.IntegerField(default=0)
    failure_reason = pw.CharField(max_length=64, null=True)
    next_restart_at = pw.DoubleField(null=True)
    created_at = pw.DoubleField()
    updated_at = pw.DoubleField()
    status_since = pw.DoubleField()
    last_admit_at = pw.DoubleField(null=True)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DoubleField(null=True)

    class Meta:
        indexes = ((("product", "user_id"), True),)

    @property
    def state(self) -> dict:
        return json.loads(self.driver_state or "{}")


class Event(BaseModel):
    """The audit log. Not tied to the engine row by a foreign key: it outlives destroy."""

    product_id = pw.IntegerField()
    user_id = pw.CharField(max_length=128)
    engine_name = pw.CharField(max_length=63)
    at = pw.DoubleField()
    event = pw.CharField(max_length=32)
    from_status = pw.CharField(max_length=16, null=True)
    to_status = pw.CharField(max_length=16, null=True)
    reason = pw.CharField(max_length=256, null=True)
    request_id = pw.CharField(max_length=128, null=True)

    class Meta:
        indexes = ((("product_id", "user_id", "id"), False),)


class PortLease(BaseModel):
    """Ports of the local driver; the primary key makes two replicas' reservations exclusive."""

    port = pw.IntegerField(primary_key=True)
    engine_name = pw.CharField(max_length=63, index=True)


MODELS = (Product, RateLimit, Engine, Event, PortLease)
_ENGINE_FIELDS = [f.name for f in Engine._meta.sorted_fields]


class Conflict(Exception):
    """A compare-and-set lost: someone else changed the row first."""


class QuotaExceeded(Exception):
    pass


class AlreadyExists(Exception):
    pass


def connect(url: str, timeout: float = 5.0) -> pw.Database:
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
    database.create_tables(MODELS, safe=True)
    return database


class _ReconnectingPostgres(ReconnectMixin, pw.PostgresqlDatabase):
    """Reconnects once when the server went away between two queries (a restart, a failover)."""


def _postgres(url: str, timeout: float) -> pw.Database:
    parsed = urlparse(url)
    ms = int(timeout * 1000)
    return _ReconnectingPostgres(
        parsed.path.lstrip("/") or "postgres", user=unquote(parsed.username or "") or None,
        password=unquote(parsed.password or "") or None, host=parsed.hostname or None,
        port=parsed.port or None, connect_timeout=max(1, int(timeout)),
        # Waiting on a lock is bounded like SQLite's busy timeout: 503, not a hung request.
        options=f"-c lock_timeout={ms} -c statement_timeout={ms * 2}")


def write_lock():
    """A transaction that serialises writers: IMMEDIATE on SQLite (PostgreSQL locks rows)."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


# ---- products -------------------------------------------------------------------------


def product_by_key_hash(key_hash: str) -> Product | None:
    return Product.get_or_none(Product.key_hash == key_hash)


def product_by_name(name: str) -> Product | None:
    return Product.get_or_none(Product.name == name)


# ---- engines --------------------------------------------------------------------------


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


def find_engine(product_id: int, user_id: str) -> Engine | None:
    # SQL written once per database instead of built by the query builder on every call
    # (building it cost more than running it).
    sql, names = hot_sql("find_engine", lambda p: (
        f'SELECT {", ".join(_q(f.column_name) for f in Engine._meta.sorted_fields)} '
        f'FROM "engine" WHERE "product_id" = {p} AND "user_id" = {p}'))
    row = execute_hot(sql, (product_id, user_id)).fetchone()
    if row is None:
        return None
    engine = Engine(__no_default__=True)
    engine.__data__ = dict(zip(names, row))  # what peewee's own row reader fills in
    return engine


# Admit reads only what a running engine's answer needs, as a tuple: a model instance and the
# other columns cost more than the query. Anything else is re-read in full with find_engine.
HOT_COLUMNS = ("id", "status", "url", "key_enc", "engine_version", "last_admit_at")


def find_engine_hot(product_id: int, user_id: str) -> tuple[Any, ...] | None:
    sql, _ = hot_sql("find_engine_hot", lambda p: (
        f'SELECT {", ".join(_q(c) for c in HOT_COLUMNS)} '
        f'FROM "engine" WHERE "product_id" = {p} AND "user_id" = {p}'))
    return execute_hot(sql, (product_id, user_id)).fetchone()


_exception_wrapper = pw.__exception_wrapper__  # sqlite3 errors -> peewee's


def execute_hot(sql: str, params: tuple[Any, ...]) -> Any:
    """db.execute_sql minus peewee's per-call layers (proxy, logging, hooks) where that is all
    it does: an open SQLite connection in autocommit (peewee opens transactions explicitly),
    same statement, same error translation. PostgreSQL (reconnects) and the rest take
    execute_sql itself."""
    database = db.obj
    if type(database) is pw.SqliteDatabase and not database._state.closed \
            and not getattr(database, "query_hooks", None):
        with _exception_wrapper:
            return database._state.conn.execute(sql, params)
    return database.execute_sql(sql, params)


_HOT: dict[tuple[str, int], str] = {}


def hot_sql(name: str, build) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    key = (name, id(db.obj))
    sql = _HOT.get(key)
    if sql is None:
        sql = _HOT[key] = build(db.obj.param)
    return sql, _ENGINE_FIELDS


def _q(column: str) -> str:
    return f'"{column}"'


def _same_row(engine: Engine):  # type: ignore[no-untyped-def]
    """This engine's row and no other: SQLite reuses the ids of deleted rows, so an id alone
    could match a newer engine of the same user."""
    return (Engine.id == engine.id) & (Engine.created_at == engine.created_at)


def reload(engine: Engine) -> Engine | None:
    return Engine.get_or_none(_same_row(engine))


def insert_engine(product_id: int, user_id: str, name: str, engine_version: str, key_enc: str,
                  owner: str, lease_s: float) -> Engine:
    """Count the product's engines and insert the new one in one transaction (the quota)."""
    now = time.time()
    with write_lock():
        product = _lock_product(product_id)
        if find_engine(product_id, user_id) is not None:
            raise AlreadyExists()
        count = Engine.select().where(Engine.product == product_id).count()
        if count >= product.max_engines:
            raise QuotaExceeded(product.max_engines)
        try:
            with db.atomic():
                engine = Engine.create(
                    product=product_id, user_id=user_id, name=name, status=states.PROVISIONING,
                    engine_version=engine_version, key_enc=key_enc, created_at=now,
                    updated_at=now, status_since=now, lease_owner=owner, lease_until=now + lease_s)
        except pw.IntegrityError:
            raise AlreadyExists() from None
        _audit(engine, "provision", None, states.PROVISIONING, None, now)
    return engine


def _lock_product(product_id: int) -> Product:
    query = Product.select().where(Product.id == product_id)
    if not isinstance(db.obj, pw.SqliteDatabase):
        query = query.for_update()
    return query.get()


def transition(engine: Engine, event: str, reason: str | None = None, **fields: Any) -> Engine:
    """Move `engine` along the state table: one compare-and-set plus one audit event.

    Raises states.IllegalTransition when the table forbids it, Conflict when the row changed
    since `engine` was read. On success `engine` is updated in place and returned.
    """
    target = states.next_state(engine.status, event)
    now = time.time()
    values = {"status": target, "status_since": now, **fields}
    with db.atomic():
        _cas(engine, values, now)
        _audit(engine, event, engine.status, target, reason, now)
    _observe_transition(engine, event, target, reason)
    for key, value in values.items():
        setattr(engine, key, value)
    return engine


def _observe_transition(engine: Engine, event: str, target: str, reason: str | None) -> None:
    metrics.TRANSITIONS.labels(event, target).inc()
    if target == states.FAILED:
        metrics.FAILURES.labels(reason or "unknown").inc()
    log.info("transition", extra={"engine": engine.name, "user_id": engine.user_id,
                                  "event": event, "from": engine.status, "to": target,
                                  "reason": reason, "request_id": request_id_var.get()})


def update(engine: Engine, audit: str | None = None, reason: str | None = None, **fields: Any) -> Engine:
    """A compare-and-set that keeps the state (driver state, url, key, restarts, ...)."""
    now = time.time()
    with db.atomic():
        _cas(engine, fields, now)
        if audit:
            _audit(engine, audit, engine.status, engine.status, reason, now)
    for key, value in fields.items():
        setattr(engine, key, value)
    return engine


def _cas(engine: Engine, values: dict[str, Any], now: float) -> None:
    if "driver_state" in values and not isinstance(values["driver_state"], str):
        values["driver_state"] = json.dumps(values["driver_state"], sort_keys=True)
    values.update(version=engine.version + 1, updated_at=now)
    changed = (Engine.update(**values)
               .where(_same_row(engine) & (Engine.version == engine.version)
                      & (Engine.status == engine.status))
               .execute())
    if changed != 1:
        raise Conflict(f"engine {engine.name} changed under us")


def delete_engine(engine: Engine, event: str = "destroyed", reason: str | None = None) -> None:
    now = time.time()
    with db.atomic():
        gone = (Engine.delete()
                .where(_same_row(engine) & (Engine.version == engine.version))
                .execute())
        if gone != 1:
            raise Conflict(f"engine {engine.name} changed under us")
        _audit(engine, event, engine.status, None, reason, now)


def touch_admit(engine_id: int, now: float) -> None:
    """Record activity for idle sleep. Not a state change: no version bump, no audit."""
    sql, _ = hot_sql("touch_admit", lambda p: f'UPDATE "engine" SET "last_admit_at" = {p} WHERE "id" = {p}')
    execute_hot(sql, (now, engine_id))


def acquire_lease(engine: Engine, owner: str, seconds: float) -> bool:
    now = time.time()
    got = (Engine.update(lease_owner=owner, lease_until=now + seconds)
           .where(_same_row(engine)
                  & (Engine.lease_owner.is_null() | (Engine.lease_until < now)
                     | (Engine.lease_owner == owner)))
           .execute())
    return got == 1


def release_lease(engine_id: int, owner: str) -> None:
    (Engine.update(lease_owner=None, lease_until=None)
     .where((Engine.id == engine_id) & (Engine.lease_owner == owner)).execute())


def list_engines(product_id: int | None = None, status: str | None = None,
                 after_id: int = 0, limit: int = 100) -> list[Engine]:
    query = Engine.select().where(Engine.id > after_id)
    if product_id is not None:
        query = query.where(Engine.product == product_id)
    if status is not None:
        query = query.where(Engine.status == status)
    return list(query.order_by(Engine.id).limit(limit))


def known_names(names: set[str]) -> set[str]:
    """Which of `names` have a registry row (in chunks: SQL parameter limits)."""
    ordered, known = sorted(names), set()
    for i in range(0, len(ordered), 500):
        chunk = ordered[i:i + 500]
        known |= {n for (n,) in Engine.select(Engine.name).where(Engine.name.in_(chunk)).tuples()}
    return known


def needing_recovery(now: float) -> list[Engine]:
    """Rows an operation was working on when its owner died: a transient state or a key
    rotation in flight, and a lease that ran out."""
    stuck = Engine.status.in_(list(states.TRANSIENT)) | Engine.pending_key_enc.is_null(False)
    expired = Engine.lease_until.is_null() | (Engine.lease_until < now)
    return list(Engine.select().where(stuck & expired).order_by(Engine.id))


def engine_counts() -> list[tuple[str, str, int]]:
    query = (Engine.select(Product.name, Engine.status, pw.fn.COUNT(Engine.id))
             .join(Product).group_by(Product.name, Engine.status).tuples())
    return list(query)


def engines_in(statuses: Iterable[str]) -> list[Engine]:
    return list(Engine.select().where(Engine.status.in_(list(statuses))).order_by(Engine.id))


# ---- audit ------------------------------------------------------------------------------


def _audit(engine: Engine, event: str, src: str | None, dst: str | None, reason: str | None,
           now: float) -> None:
    Event.create(product_id=_product_id(engine), user_id=engine.user_id, engine_name=engine.name,
                 at=now, event=event, from_status=src, to_status=dst,
                 reason=reason[:256] if reason else None, request_id=request_id_var.get())


def _product_id(engine: Engine) -> int:
    return engine.__data__["product"]


def events_for(product_id: int, user_id: str | None = None, limit: int = 100) -> list[Event]:
    query = Event.select().where(Event.product_id == product_id)
    if user_id is not None:
        query = query.where(Event.user_id == user_id)
    return list(query.order_by(Event.id.desc()).limit(limit))


def recent_events(limit: int = 100) -> list[Event]:
    return list(Event.select().order_by(Event.id.desc()).limit(limit))


def events_page(product_id: int, user_id: str, before_id: int | None, limit: int) -> list[Event]:
    """One page of a user's events, newest first, older than `before_id` (the API's cursor)."""
    query = Event.select().where((Event.product_id == product_id) & (Event.user_id == user_id))
    if before_id is not None:
        query = query.where(Event.id < before_id)
    return list(query.order_by(Event.id.desc()).limit(limit))
