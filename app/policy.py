"""Policy: the product's admit rate limit. (The quota lives in registry.insert_engine, where the
count and the insert share one transaction.)

The limiter is GCRA over a counter in the database, so it holds across replicas: each product
has a theoretical arrival time (TAT); an admit at `now` is allowed when TAT <= now + tau, and
pushes TAT to max(TAT, now) + T, with T = 60 / rpm and tau = 60 - T. That allows a burst of
`rpm` admits, then exactly one every T seconds: smooth, with no 2x burst at a minute boundary.
The check and the update are one conditional UPDATE, so concurrent admits cannot both take the
last slot.
"""

from __future__ import annotations

import math

import peewee as pw

from app.registry import RateLimit


def admit_retry_after(product_id: int, rpm: int, now: float) -> int | None:
    """None when the admit is allowed (and counted), else the seconds to wait."""
    interval = 60.0 / rpm
    tolerance = 60.0 - interval
    for _ in range(2):
        if _take(product_id, now, interval, tolerance):
            return None
        row = RateLimit.get_or_none(RateLimit.product_id == product_id)
        if row is not None:
            return max(1, math.ceil(row.tat - tolerance - now))
        RateLimit.insert(product_id=product_id, tat=0.0).on_conflict_ignore().execute()
    return None


def _take(product_id: int, now: float, interval: float, tolerance: float) -> bool:
    new_tat = pw.Case(None, [(RateLimit.tat > now, RateLimit.tat)], now) + interval
    taken = (RateLimit.update(tat=new_tat)
             .where((RateLimit.product_id == product_id) & (RateLimit.tat <= now + tolerance))
             .execute())
    return taken == 1


def reset(product_id: int) -> None:
    RateLimit.delete().where(RateLimit.product_id == product_id).execute()
