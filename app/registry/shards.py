"""Shards of the reconciler's work, leased in the database.

An engine's shard is a hash of its id (consecutive ids spread over every shard). Each live
replica heartbeats (`claim`) a few times a lease period: in one transaction it renews its
replica row and its shards' leases, gives back what it holds beyond its fair share (so a new
replica gets work), and takes free or expired shards up to that share (so a dead replica's
shards are taken over once their lease ends).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable

import peewee as pw

from app.registry.db import tuples, write_lock
from app.registry.models import Replica, ShardLease, db

SHARDS = 32


def shard_of(engine_id: int) -> int:
    # Knuth's multiplicative hash: the top bits of id * 2^32/phi, taken modulo 2^32.
    return (((engine_id * 2654435761) & 0xFFFFFFFF) * SHARDS) >> 32


def claim(owner: str, lease_s: float, now: float | None = None,
          gone: Callable[[str], bool] = lambda owner: False) -> frozenset[int]:
    """Heartbeat as `owner`; return the shards it now holds until `now + lease_s`. A holder
    `gone` says is dead (a process of this host that no longer exists) is not waited for."""
    now = time.time() if now is None else now
    until = now + lease_s
    with write_lock():
        _seed()
        Replica.insert(owner=owner, until=until).on_conflict(
            conflict_target=[Replica.owner], update={Replica.until: until}).execute()
        Replica.delete().where(Replica.until < now - 10 * lease_s).execute()  # long gone
        live = sum(1 for (o,) in tuples(Replica.select(Replica.owner).where(Replica.until >= now))
                   if o == owner or not gone(o))
        fair = math.ceil(SHARDS / max(1, live))
        leases = tuples(ShardLease.select(ShardLease.shard, ShardLease.owner, ShardLease.until)
                        .order_by(ShardLease.shard))
        mine = [s for s, o, _ in leases if o == owner]
        free = [s for s, o, u in leases if o != owner and (o is None or u < now or gone(o))]
        keep, give_back = mine[:fair], mine[fair:]
        take = free[:max(0, fair - len(keep))]
        if give_back:
            ShardLease.update(owner=None, until=0.0).where(ShardLease.shard.in_(give_back)).execute()
        held = keep + take
        if held:
            ShardLease.update(owner=owner, until=until).where(ShardLease.shard.in_(held)).execute()
    return frozenset(held)


def release(owner: str) -> None:
    """A replica shutting down hands its shards back at once."""
    with write_lock():
        ShardLease.update(owner=None, until=0.0).where(ShardLease.owner == owner).execute()
        Replica.delete().where(Replica.owner == owner).execute()


def holders() -> dict[int, str | None]:
    """Each shard's current holder (for operators and tests)."""
    now = time.time()
    return {int(s): (o if u >= now else None)
            for s, o, u in tuples(ShardLease.select(ShardLease.shard, ShardLease.owner, ShardLease.until))}


def _seed() -> None:
    """The SHARDS lease rows, made once per database (rows are never deleted: one look per
    process, not one per heartbeat)."""
    if db.obj in _seeded:
        return
    if ShardLease.select().count() < SHARDS:
        rows = [{"shard": n, "owner": None, "until": 0.0} for n in range(SHARDS)]
        ShardLease.insert_many(rows).on_conflict_ignore().execute()
    _seeded.add(db.obj)


_seeded: weakref.WeakSet[pw.Database] = weakref.WeakSet()  # the databases whose lease rows exist


__all__ = ["SHARDS", "claim", "holders", "release", "shard_of"]
