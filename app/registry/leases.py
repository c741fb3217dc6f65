"""Leases on rows: who may work on an engine or drive a rollout, and until when.

A lease is two columns, `lease_owner` and `lease_until`, taken by a compare-and-set: the row is
free, its lease has run out, or it is ours already (a renewal). The holder alone gives it back.
Shards (shards.py) are leased too, but in batches inside one write transaction, with a check
that the holder's process is gone, so they keep their own form.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from peewee import Expression


class Leased(Protocol):
    """A model with the two lease columns (Engine, Rollout)."""

    lease_owner: Any
    lease_until: Any

    @classmethod
    def update(cls, *args: Any, **kwargs: Any) -> Any: ...


def take(model: type[Leased], which: Expression, owner: str, seconds: float) -> bool:
    """Take or renew the lease of the row `which` selects: free, expired, or ours already."""
    now = time.time()
    free_or_ours = (model.lease_owner.is_null() | (model.lease_until < now)
                    | (model.lease_owner == owner))
    got = (model.update(lease_owner=owner, lease_until=now + seconds)
           .where(which & free_or_ours).execute())
    return bool(got == 1)


def give_back(model: type[Leased], which: Expression, owner: str) -> None:
    """Release the lease, if `owner` still holds it (an expired one taken over stays taken)."""
    model.update(lease_owner=None, lease_until=None).where(which & (model.lease_owner == owner)).execute()


__all__ = ["give_back", "take"]
