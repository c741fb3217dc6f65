"""Engine rows: the typed row operations pass around, and every write to the engine table.

Every change of an engine's state is one compare-and-set on (id, created_at, row_version,
status) plus one audit event, in one transaction (`transition`). Timestamps are float epoch
seconds, compared and stored the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import peewee as pw

from app import errors, states
from app.registry import leases, walstamp
from app.registry.db import execute_hot, hot_sql, next_id, tuples, write_lock
from app.registry.events import Transition, audit, publish
from app.registry.models import ENGINE_COLUMNS, Engine, Product, db


@dataclass(frozen=True, slots=True)
class EngineRow:
    """One engine row as read; operations return the next one rather than mutating this."""

    id: int
    product_id: int
    user_id: str
    name: str
    status: str
    row_version: int
    engine_version: str
    url: str | None
    key_enc: str
    pending_key_enc: str | None
    driver_state: dict[str, Any]
    restarts: int
    failure_reason: str | None
    next_restart_at: float | None
    created_at: float
    updated_at: float
    status_since: float
    last_admit_at: float | None
    lease_owner: str | None
    lease_until: float | None
    previous_version: str | None  # an upgrade in flight: the version to go back to
    in_pool: bool  # a warm pool's engine, waiting for a user
    claimed_at: float | None  # taken from the pool by its user at this time

    @property
    def key(self) -> tuple[int, str]:
        """What identifies the engine across incarnations: (product id, user id)."""
        return (self.product_id, self.user_id)


# Column order of ENGINE_COLUMNS -> EngineRow fields ("product_id" is the column of `product`).
_FIELDS = tuple(f.name for f in dataclasses.fields(EngineRow))
assert set(ENGINE_COLUMNS) == set(_FIELDS), "EngineRow and the engine table differ"


def _row(values: tuple[Any, ...]) -> EngineRow:
    data = dict(zip(ENGINE_COLUMNS, values))
    data["driver_state"] = json.loads(data["driver_state"] or "{}")
    data["in_pool"] = bool(data["in_pool"])
    return EngineRow(**data)


_SELECT = 'SELECT {} FROM "engine"'.format(", ".join(f'"{c}"' for c in ENGINE_COLUMNS))


def find_engine(product_id: int, user_id: str) -> EngineRow | None:
    sql = hot_sql("find_engine", lambda p: f'{_SELECT} WHERE "product_id" = {p} AND "user_id" = {p}')
    values = execute_hot(sql, (product_id, user_id)).fetchone()
    return None if values is None else _row(values)


# Admit reads only what a running engine's answer needs, as a tuple: a row object and the
# other columns cost more than the query. Anything else is re-read in full with find_engine.
HOT_COLUMNS = ("id", "status", "url", "key_enc", "engine_version", "last_admit_at")


def find_engine_hot(product_id: int, user_id: str) -> tuple[Any, ...] | None:
    """HOT_COLUMNS of the user's engine. On SQLite, rows read since the last commit to the
    database (by anyone: walstamp) are answered again without a read; any commit, this
    replica's admits' own included, starts over."""
    global _hot_stamp
    # Before the read: a commit after it is seen by the next call. Not in a transaction: what
    # it has written is not committed (the stamp has not moved), and may never be.
    stamp = None if db.in_transaction() else walstamp.stamp()
    key = (product_id, user_id)
    if stamp is not None:
        if stamp == _hot_stamp:
            hit = _hot_rows.get(key)
            if hit is not None:
                return hit
        else:
            _hot_rows.clear()
            _hot_stamp = stamp
    sql = hot_sql("find_engine_hot", lambda p: (
        f'SELECT {", ".join(chr(34) + c + chr(34) for c in HOT_COLUMNS)} '
        f'FROM "engine" WHERE "product_id" = {p} AND "user_id" = {p}'))
    values: tuple[Any, ...] | None = execute_hot(sql, (product_id, user_id)).fetchone()
    if stamp is not None and values is not None:
        if len(_hot_rows) >= HOT_ROWS_MAX:
            _hot_rows.clear()
        _hot_rows[key] = values
    return values


HOT_ROWS_MAX = 100_000
_hot_rows: dict[tuple[int, str], tuple[Any, ...]] = {}  # as read under _hot_stamp
_hot_stamp: bytes | None = None


def touch_admit(engine_id: int, now: float) -> None:
    """Record activity for idle sleep. Not a state change: no row_version bump, no audit."""
    sql = hot_sql("touch_admit", lambda p: f'UPDATE "engine" SET "last_admit_at" = {p} WHERE "id" = {p}')
    execute_hot(sql, (now, engine_id))


def _same_row(row: EngineRow) -> Any:
    """This engine's row and no other: an id alone could match a newer engine of the same
    user on a database that reuses the ids of deleted rows."""
    return (Engine.id == row.id) & (Engine.created_at == row.created_at)


def reload(row: EngineRow) -> EngineRow | None:
    sql = hot_sql("reload", lambda p: f'{_SELECT} WHERE "id" = {p} AND "created_at" = {p}')
    values = execute_hot(sql, (row.id, row.created_at)).fetchone()
    return None if values is None else _row(values)


def insert_engine(product_id: int, user_id: str, name: str, engine_version: str, key_enc: str,
                  owner: str, lease_s: float, in_pool: bool = False) -> EngineRow:
    """Count the product's engines and insert the new one in one transaction (the quota).
    The new row is leased to `owner`: its provision is under way."""
    now = time.time()
    with write_lock():
        product = _lock_product(product_id)
        if find_engine(product_id, user_id) is not None:
            raise errors.already_exists(user_id)
        count = Engine.select().where(Engine.product == product_id).count()
        if count >= product.max_engines:
            raise errors.quota_exceeded(product.max_engines)
        engine_id = next_id(Engine)  # never one a destroyed engine had: its events keep it
        try:
            with Engine._meta.database.atomic():
                Engine.insert(
                    id=engine_id, product=product_id, user_id=user_id, name=name,
                    status=states.PROVISIONING,
                    engine_version=engine_version, key_enc=key_enc, created_at=now,
                    updated_at=now, status_since=now, lease_owner=owner,
                    lease_until=now + lease_s, in_pool=in_pool).execute()
        except pw.IntegrityError:
            raise errors.already_exists(user_id) from None
        row = find_engine(product_id, user_id)
        assert row is not None
        change = audit(product_id, user_id, name, "provision", None, states.PROVISIONING, None, now,
                       row.id)
    publish(change)
    return row


def _lock_product(product_id: int) -> Product:
    query = Product.select().where(Product.id == product_id)
    if not isinstance(Engine._meta.database.obj, pw.SqliteDatabase):
        query = query.for_update()
    product: Product = query.get()
    return product


def transition(row: EngineRow, event: str, reason: str | None = None, **fields: Any) -> EngineRow:
    """Move `row` along the state table: one compare-and-set plus one audit event.

    Raises errors.IllegalTransition when the table forbids it, errors.Conflict when the row
    changed since `row` was read. Returns the row as written.
    """
    target = states.next_state(row.status, event)
    now = time.time()
    values = {"status": target, "status_since": now, **fields}
    with write_lock():
        written = _cas(row, values, now)
        change = audit(row.product_id, row.user_id, row.name, event, row.status, target, reason, now,
                       row.id)
    publish(change)
    return written


def update(row: EngineRow, audit_event: str | None = None, reason: str | None = None,
           **fields: Any) -> EngineRow:
    """A compare-and-set that keeps the state (driver state, url, key, restarts, ...)."""
    now = time.time()
    change: Transition | None = None
    with write_lock():
        written = _cas(row, fields, now)
        if audit_event:
            change = audit(row.product_id, row.user_id, row.name, audit_event, row.status,
                           row.status, reason, now, row.id)
    if change is not None:
        publish(change)
    return written


def _cas(row: EngineRow, values: dict[str, Any], now: float) -> EngineRow:
    stored = dict(values, row_version=row.row_version + 1, updated_at=now)
    if "driver_state" in stored:
        stored["driver_state"] = json.dumps(stored["driver_state"] or {}, sort_keys=True)
    changed = (Engine.update(**stored)
               .where(_same_row(row) & (Engine.row_version == row.row_version)
                      & (Engine.status == row.status))
               .execute())
    if changed != 1:
        raise errors.Conflict(f"the engine of user {row.user_id!r} changed meanwhile; try again")
    return dataclasses.replace(row, **dict(values, row_version=row.row_version + 1, updated_at=now))


def delete_engine(row: EngineRow, event: str = "destroyed", reason: str | None = None) -> None:
    now = time.time()
    with write_lock():
        gone = (Engine.delete()
                .where(_same_row(row) & (Engine.row_version == row.row_version))
                .execute())
        if gone != 1:
            raise errors.Conflict(f"the engine of user {row.user_id!r} changed meanwhile; try again")
        change = audit(row.product_id, row.user_id, row.name, event, row.status, None, reason, now,
                       row.id)
    publish(change)


# ---- leases --------------------------------------------------------------------------------


def acquire_lease(row: EngineRow, owner: str, seconds: float) -> bool:
    """Take (or renew) the row's lease: free, expired, or ours already."""
    return leases.take(Engine, _same_row(row), owner, seconds)


def release_lease(row: EngineRow, owner: str) -> None:
    leases.give_back(Engine, _same_row(row), owner)


# ---- reads ---------------------------------------------------------------------------------


def list_engines(product_id: int | None = None, status: str | None = None,
                 after_id: int = 0, limit: int = 100) -> list[EngineRow]:
    query = Engine.select().where((Engine.id > after_id) & ~Engine.in_pool)  # users' engines
    if product_id is not None:
        query = query.where(Engine.product == product_id)
    if status is not None:
        query = query.where(Engine.status == status)
    return _rows(query.order_by(Engine.id).limit(limit))


def _rows(query: Any) -> list[EngineRow]:
    return [_row(values) for values in tuples(query)]


def known_names(names: set[str]) -> set[str]:
    """Which of `names` have a registry row (in chunks: SQL parameter limits)."""
    ordered, known = sorted(names), set()
    for i in range(0, len(ordered), 500):
        chunk = ordered[i:i + 500]
        known |= {str(n) for (n,) in tuples(Engine.select(Engine.name).where(Engine.name.in_(chunk)))}
    return known


def needing_recovery(now: float) -> list[EngineRow]:
    """Rows an operation was working on when its owner died: a transient state or a key
    rotation in flight, and a lease that ran out."""
    stuck = Engine.status.in_(list(states.TRANSIENT)) | Engine.pending_key_enc.is_null(False)
    expired = Engine.lease_until.is_null() | (Engine.lease_until < now)
    return _rows(Engine.select().where(stuck & expired).order_by(Engine.id))


def engines_in(statuses: Iterable[str]) -> list[EngineRow]:
    # Hot SQL: the reconciler's resync reads every running row with it, and
    # peewee's builder cost some 50 times what SQLite takes to answer.
    wanted = tuple(statuses)
    if not wanted:
        return []
    sql = hot_sql(f"engines_in:{len(wanted)}",
                  lambda p: f'{_SELECT} WHERE "status" IN ({", ".join([p] * len(wanted))}) ORDER BY "id"')
    return [_row(values) for values in execute_hot(sql, wanted).fetchall()]


# ---- the reconciler's reads: each one indexed, none reads every running row ----


def restartable_failed(max_restarts: int) -> list[EngineRow]:
    """Failed rows with restarts left: an engine out of them stays failed for good, and a
    fleet can gather many (read unfiltered, they would be most of the reads at rest)."""
    sql = hot_sql("restartable_failed", lambda p: (
        f'{_SELECT} WHERE "status" = {p} AND "restarts" < {p} ORDER BY "id"'))
    return [_row(values) for values in execute_hot(sql, (states.FAILED, max_restarts)).fetchall()]


def engine_named(name: str) -> EngineRow | None:
    sql = hot_sql("engine_named", lambda p: f'{_SELECT} WHERE "name" = {p}')
    values = execute_hot(sql, (name,)).fetchone()
    return None if values is None else _row(values)


def engines_by_ids(ids: Iterable[int], status: str) -> list[EngineRow]:
    """Rows among `ids` (chunked: SQL parameter limits) that are in `status`."""
    ordered, found = sorted(ids), []
    for i in range(0, len(ordered), 500):
        chunk = ordered[i:i + 500]
        found += _rows(Engine.select().where(Engine.id.in_(chunk) & (Engine.status == status)))
    return found


def entered_since(status: str, since: float) -> list[EngineRow]:
    """Rows that entered `status` after `since` (index on status, status_since). Hot SQL:
    the reconciler asks every tick."""
    sql = hot_sql("entered_since", lambda p: f'{_SELECT} WHERE "status" = {p} AND "status_since" > {p}')
    return [_row(values) for values in execute_hot(sql, (status, since)).fetchall()]


def failed_because(reason: str) -> list[EngineRow]:
    """Failed rows whose failure was `reason` (the status index)."""
    sql = hot_sql("failed_because", lambda p: (
        f'{_SELECT} WHERE "status" = {p} AND "failure_reason" = {p} ORDER BY "id"'))
    return [_row(values) for values in execute_hot(sql, (states.FAILED, reason)).fetchall()]


def with_state_key(key: str) -> list[EngineRow]:
    """Rows whose driver state holds `key` (a driver's note of what it must remove later).
    A scan: the reconciler asks once a lease period."""
    pattern = '%"' + key + '"%'
    sql = hot_sql("with_state_key", lambda p: f'{_SELECT} WHERE "driver_state" LIKE {p}')
    return [_row(values) for values in execute_hot(sql, (pattern,)).fetchall()]


def idle_running(cutoff: float) -> list[EngineRow]:
    """Running rows with no admit and no state change since `cutoff`: idle sleep's candidates,
    read through the (status, last_admit_at) index rather than a scan of running rows."""
    # The unary + keeps the planner off the (status, status_since) index, under which every
    # long-running engine would be read.
    def build(p: str) -> str:
        branch = f'{_SELECT} WHERE "status" = {p} AND "last_admit_at" {{}} AND +"status_since" < {p}'
        return f'{branch.format("< " + p)} UNION ALL {branch.format("IS NULL")}'

    sql = hot_sql("idle_running", build)
    params = (states.RUNNING, cutoff, cutoff, states.RUNNING, cutoff)
    return [_row(values) for values in execute_hot(sql, params).fetchall()]


def engine_counts() -> list[tuple[str, str, int]]:
    query = (Engine.select(Product.name, Engine.status, pw.fn.COUNT(Engine.id))
             .join(Product).group_by(Product.name, Engine.status))
    return [(str(p), str(s), int(n)) for p, s, n in tuples(query)]
