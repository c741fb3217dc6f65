"""Rate-limit slots (the GCRA counter of app.policy), written here like every other row."""

from __future__ import annotations

from app.registry.db import execute_hot, hot_sql
from app.registry.models import RateLimit


def take(product_id: int, now: float, increment: float, latest: float) -> bool:
    """Push the product's TAT by `increment` if it is at most `latest`: one conditional UPDATE."""
    sql = hot_sql("gcra_take", lambda p: (
        f'UPDATE "rate_limit" SET "tat" = (CASE WHEN "tat" > {p} THEN "tat" ELSE {p} END) + {p} '
        f'WHERE "product_id" = {p} AND "tat" <= {p}'))
    cursor = execute_hot(sql, (now, now, increment, product_id, latest))
    return bool(cursor.rowcount == 1)


def tat(product_id: int) -> float | None:
    """The product's theoretical arrival time; None before its first admit (then the row is made)."""
    row = RateLimit.get_or_none(RateLimit.product_id == product_id)
    if row is None:
        RateLimit.insert(product_id=product_id, tat=0.0).on_conflict_ignore().execute()
        return None
    return float(row.tat)


def reset(product_id: int) -> None:
    RateLimit.delete().where(RateLimit.product_id == product_id).execute()
