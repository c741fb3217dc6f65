"""Rollout rows: a rollout, its targets (one per engine), and its lease.

A rollout is run by one replica at a time: the one whose lease on the rollout row is live.
Every write is a single UPDATE guarded by what it expects (the status, the lease owner)."""

from __future__ import annotations

import time
from typing import Any

from app.registry import leases
from app.registry.db import write_lock
from app.registry.models import Engine, Event, Rollout, RolloutTarget

ACTIVE = ("running", "paused")


def create_rollout(product_id: int, to_version: str, from_version: str | None, batch_size: int,
                   max_failures: int) -> Rollout:
    """The rollout and its targets (the product's engines on `from_version`, when given, and
    not on `to_version` already), in one transaction."""
    now = time.time()
    with write_lock():
        rollout = Rollout.create(product_id=product_id, status="running", to_version=to_version,
                                 from_version=from_version, batch_size=batch_size,
                                 max_failures=max_failures, created_at=now, updated_at=now)
        engines = Engine.select(Engine.user_id, Engine.engine_version).where(
            (Engine.product == product_id) & (Engine.engine_version != to_version)
            & ~Engine.in_pool)  # the warm pool replaces its own engines (app.pool)
        if from_version is not None:
            engines = engines.where(Engine.engine_version == from_version)
        rows = [{"rollout_id": rollout.id, "user_id": e.user_id, "position": i,
                 "previous_version": e.engine_version, "state": "pending"}
                for i, e in enumerate(engines.order_by(Engine.id))]
        if rows:
            RolloutTarget.insert_many(rows).execute()
    return rollout


def get_rollout(product_id: int, rollout_id: int) -> Rollout | None:
    found: Rollout | None = Rollout.get_or_none((Rollout.id == rollout_id)
                                                & (Rollout.product_id == product_id))
    return found


def list_rollouts(product_id: int, limit: int = 100) -> list[Rollout]:
    return list(Rollout.select().where(Rollout.product_id == product_id)
                .order_by(Rollout.id.desc()).limit(limit))


def targets(rollout_id: int) -> list[RolloutTarget]:
    return list(RolloutTarget.select().where(RolloutTarget.rollout_id == rollout_id)
                .order_by(RolloutTarget.position))


def set_status(rollout: Rollout, expected: tuple[str, ...], status: str) -> bool:
    """Compare-and-set of the rollout's status: only from one of `expected`."""
    changed = (Rollout.update(status=status, updated_at=time.time())
               .where((Rollout.id == rollout.id) & Rollout.status.in_(list(expected))).execute())
    return bool(changed == 1)


def set_target(rollout_id: int, user_id: str, state: str, reason: str | None = None) -> None:
    with write_lock():
        (RolloutTarget.update(state=state, reason=reason[:256] if reason else None)
         .where((RolloutTarget.rollout_id == rollout_id) & (RolloutTarget.user_id == user_id))
         .execute())
        Rollout.update(updated_at=time.time()).where(Rollout.id == rollout_id).execute()


def runnable() -> list[Rollout]:
    """Rollouts to run: running, their lease free or expired."""
    now = time.time()
    return list(Rollout.select().where((Rollout.status == "running") & (
        Rollout.lease_owner.is_null() | (Rollout.lease_until < now))).order_by(Rollout.id))


def acquire_rollout(rollout_id: int, owner: str, seconds: float) -> bool:
    """Take or renew the rollout's lease: free, expired, or ours already."""
    return leases.take(Rollout, Rollout.id == rollout_id, owner, seconds)


def release_rollout(rollout_id: int, owner: str) -> None:
    leases.give_back(Rollout, Rollout.id == rollout_id, owner)


def reload_rollout(rollout_id: int) -> Rollout | None:
    found: Rollout | None = Rollout.get_or_none(Rollout.id == rollout_id)
    return found


def summary(rollout_id: int) -> dict[str, Any]:
    """Counts and failures, for the API's rollout object."""
    rows = targets(rollout_id)
    return {"total": len(rows),
            "upgraded": sum(1 for t in rows if t.state == "upgraded"),
            "failed": sum(1 for t in rows if t.state == "failed"),
            "failures": [{"user_id": t.user_id, "reason": t.reason or ""}
                         for t in rows if t.state == "failed"]}


def _rollout_events(rollout: Rollout) -> Any:
    """The audit events of the rollout's engines since it was created (upgrades, and
    whatever else happened to those engines meanwhile)."""
    users = RolloutTarget.select(RolloutTarget.user_id).where(RolloutTarget.rollout_id == rollout.id)
    return Event.select().where((Event.product_id == rollout.product_id)
                                & Event.user_id.in_(users) & (Event.at >= rollout.created_at))


def rollout_events_page(rollout: Rollout, before_id: int | None, limit: int) -> list[Event]:
    """Newest first, older than `before_id` (the API's cursor)."""
    query = _rollout_events(rollout)
    if before_id is not None:
        query = query.where(Event.id < before_id)
    return list(query.order_by(Event.id.desc()).limit(limit))


def rollout_events_after(rollout: Rollout, after_id: int, limit: int = 100) -> list[Event]:
    """Oldest first, newer than `after_id` (a follower's next ones)."""
    return list(_rollout_events(rollout).where(Event.id > after_id).order_by(Event.id).limit(limit))
