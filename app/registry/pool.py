"""The warm pool's rows: claiming a pooled engine for a user, the pool's reads and its lease.

A pooled engine is an ordinary engine row with `in_pool` set and a user id no user can have
(POOL_PREFIX: user ids never contain '/'). A claim moves one such row to a user in one
compare-and-set, so no engine goes to two users, on any number of replicas: the unique
(product, user_id) index refuses a second engine for the same user, and the row's
(row_version, status, in_pool) refuse a second claimer of the same engine.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

import peewee as pw

from app import errors, states
from app.registry import leases
from app.registry.db import execute_hot, hot_sql, is_sqlite, tuples, write_lock
from app.registry.engines import EngineRow, _row
from app.registry.events import audit, publish
from app.registry.models import ENGINE_COLUMNS, Engine, PoolLease, Product, Rollout

POOL_PREFIX = "/pool/"
CLAIMABLE = (states.RUNNING, states.SLEEPING)
BOOTING = (states.PROVISIONING, states.STARTING)


def new_pool_user() -> str:
    """The placeholder user id of a new pooled engine (its name is derived from it)."""
    return POOL_PREFIX + secrets.token_hex(4)


def claim(product_id: int, user_id: str, version: str, owner: str,
          lease_s: float) -> tuple[EngineRow, str] | None:
    """Give `user_id` a ready pooled engine on `version`: (the row, leased to `owner` and
    `starting`, and the state it left), or None when the pool has none. Raises
    EngineAlreadyExists when the user has an engine (made meanwhile by another replica)."""
    now = time.time()
    with write_lock():
        found = _claimable(product_id, version, now)
        if found is None:
            return None
        values: dict[str, Any] = {"user_id": user_id, "in_pool": False, "claimed_at": now,
                  "status": states.next_state(found.status, "claimed"), "status_since": now,
                  "lease_owner": owner, "lease_until": now + lease_s, "last_admit_at": None,
                  "row_version": found.row_version + 1, "updated_at": now}
        try:
            with Engine._meta.database.atomic():
                changed = execute_hot(hot_sql("pool_claim", _claim_sql), (
                    user_id, False, now, values["status"], now, owner, now + lease_s,
                    values["row_version"], now, found.id, found.row_version, found.status)).rowcount
        except pw.IntegrityError:
            raise errors.already_exists(user_id) from None
        if changed != 1:
            return None  # taken meanwhile (PostgreSQL, whose SKIP LOCKED we did not beat)
        change = audit(product_id, user_id, found.name, "claimed", found.status, states.STARTING,
                       None, now, found.id)
    publish(change)
    return dataclasses.replace(found, **values), found.status


def ready(row: EngineRow) -> EngineRow:
    """A claimed engine that knows its user: `running`, in one compare-and-set (as
    registry.transition, in SQL written once: the claim's answer waits for it)."""
    now = time.time()
    target = states.next_state(row.status, "ready")
    with write_lock():
        changed = execute_hot(hot_sql("pool_ready", _ready_sql), (
            target, now, row.row_version + 1, now,
            row.id, row.created_at, row.row_version, row.status)).rowcount
        if changed != 1:
            raise errors.Conflict(f"the engine of user {row.user_id!r} changed meanwhile; try again")
        change = audit(row.product_id, row.user_id, row.name, "ready", row.status, target, None,
                       now, row.id)
    publish(change)
    return dataclasses.replace(row, status=target, status_since=now,
                               row_version=row.row_version + 1, updated_at=now)


def _claim_sql(p: str) -> str:
    return (f'UPDATE "engine" SET "user_id" = {p}, "in_pool" = {p}, "claimed_at" = {p}, '
            f'"status" = {p}, "status_since" = {p}, "lease_owner" = {p}, "lease_until" = {p}, '
            f'"last_admit_at" = NULL, "row_version" = {p}, "updated_at" = {p} '
            f'WHERE "id" = {p} AND "row_version" = {p} AND "status" = {p} AND "in_pool"')


def _ready_sql(p: str) -> str:
    return (f'UPDATE "engine" SET "status" = {p}, "status_since" = {p}, "row_version" = {p}, '
            f'"updated_at" = {p} WHERE "id" = {p} AND "created_at" = {p} '
            f'AND "row_version" = {p} AND "status" = {p}')


_SELECT = 'SELECT {} FROM "engine"'.format(", ".join(f'"{c}"' for c in ENGINE_COLUMNS))


def _claimable(product_id: int, version: str, now: float) -> EngineRow | None:
    """A ready pooled engine nobody holds: running ones first (no resume to wait for)."""
    lock = "" if is_sqlite() else " FOR UPDATE SKIP LOCKED"  # a row another claimer holds is skipped
    sql = hot_sql("pool_claimable", lambda p: (
        f'{_SELECT} WHERE "product_id" = {p} AND "in_pool" AND "status" IN ({p}, {p}) '
        f'AND "engine_version" = {p} AND ("lease_owner" IS NULL OR "lease_until" < {p}) '
        f'ORDER BY CASE WHEN "status" = {p} THEN 0 ELSE 1 END, "id" LIMIT 1{lock}'))
    values = execute_hot(sql, (product_id, *CLAIMABLE, version, now, states.RUNNING)).fetchone()
    return None if values is None else _row(tuple(values))


def pooled(product_id: int) -> list[EngineRow]:
    """The product's pooled engines, every state."""
    query = Engine.select(*[getattr(Engine, c if c != "product_id" else "product")
                            for c in ENGINE_COLUMNS]).where(
        (Engine.product == product_id) & Engine.in_pool).order_by(Engine.id)
    return [_row(values) for values in tuples(query)]


def warm_counts() -> dict[int, int]:
    """Ready pooled engines per product id: those a claim would take now, so unleased too (a
    row stays leased by its provision for a moment after it is `running`)."""
    free = Engine.lease_owner.is_null() | (Engine.lease_until < time.time())
    query = (Engine.select(Engine.product, pw.fn.COUNT(Engine.id))
             .where(Engine.in_pool & Engine.status.in_(CLAIMABLE) & free).group_by(Engine.product))
    return {int(p): int(n) for p, n in tuples(query)}


def booting_at_quota(product_id: int, version: str) -> bool:
    """The product is at its quota and a pooled engine on `version` is still booting: a new
    user waits for it rather than being refused because of the pool."""
    product = Product.get_or_none(Product.id == product_id)
    if product is None:
        return False
    total = Engine.select().where(Engine.product == product_id).count()
    if total < product.max_engines:
        return False
    return bool(Engine.select().where(
        (Engine.product == product_id) & Engine.in_pool & Engine.status.in_(BOOTING)
        & (Engine.engine_version == version)).exists())


def fleet_version(product_id: int) -> str | None:
    """The `to_version` of the product's latest rollout of its whole fleet (no from_version)
    that is under way or succeeded: new engines get it rather than the configured image."""
    found = (Rollout.select(Rollout.to_version)
             .where((Rollout.product_id == product_id) & Rollout.from_version.is_null()
                    & Rollout.status.in_(("running", "paused", "succeeded")))
             .order_by(Rollout.id.desc()).limit(1).scalar())
    return None if found is None else str(found)


def target(product_id: int) -> int:
    """How many engines the product's pool keeps (0: no pool)."""
    value = Product.select(Product.warm_pool).where(Product.id == product_id).scalar()
    return int(value or 0)


def pool_products() -> list[Product]:
    """Products with a pool, or with pooled engines left over from one."""
    with_rows = Engine.select(Engine.product).where(Engine.in_pool).distinct()
    return list(Product.select().where((Product.warm_pool > 0) | Product.id.in_(with_rows))
                .order_by(Product.id))


def take_lease(product_id: int, owner: str, seconds: float) -> bool:
    """Refill `product_id`'s pool: one replica at a time."""
    PoolLease.insert(product_id=product_id).on_conflict_ignore().execute()
    return leases.take(PoolLease, PoolLease.product_id == product_id, owner, seconds)


def give_back_lease(product_id: int, owner: str) -> None:
    leases.give_back(PoolLease, PoolLease.product_id == product_id, owner)


def drop_lease(product_id: int) -> None:
    PoolLease.delete().where(PoolLease.product_id == product_id).execute()


__all__ = ["POOL_PREFIX", "booting_at_quota", "claim", "drop_lease", "fleet_version", "give_back_lease",
           "new_pool_user", "pool_products", "pooled", "ready", "take_lease", "target",
           "warm_counts"]
