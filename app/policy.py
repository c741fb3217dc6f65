"""Policy: the product's admit rate limit. (The quota lives in registry.insert_engine, where the
count and the insert share one transaction.)

The limiter is GCRA over a counter in the database, so it holds across replicas: each product
has a theoretical arrival time (TAT); an admit at `now` is allowed when TAT <= now + tau, and
pushes TAT to max(TAT, now) + T, with T = 60 / rpm and tau = 60 - T. That allows a burst of
`rpm` admits, then exactly one every T seconds: smooth, with no 2x burst at a minute boundary.
The check and the update are one conditional UPDATE, so concurrent admits cannot both take the
last slot.

Under heavy load a replica takes several slots in one UPDATE (`Limiter`) and spends them over
the next RESERVE_S; slots it does not spend in time are dropped, never returned, so batching
can only make the limit stricter, never looser. At low rates it takes one slot per admit.
"""

from __future__ import annotations

import math
import time

from app.registry import limits

RESERVE_S = 0.02  # how long reserved slots stay spendable
MAX_BATCH = 64


class Limiter:
    def __init__(self) -> None:
        # product id -> [slots left, spendable until (monotonic), admits seen, window start,
        #                batch size measured over the last window]
        self._local: dict[int, list[float]] = {}

    def retry_after(self, product_id: int, rpm: int, now: float) -> int | None:
        """None when the admit is allowed (and counted), else the seconds to wait."""
        mono = time.monotonic()
        local = self._local.get(product_id)
        if local is None:
            local = self._local[product_id] = [0, 0.0, 0, mono, 1]
        local[2] += 1
        if local[0] > 0 and mono < local[1]:
            local[0] -= 1
            return None
        batch = self._batch_size(local, mono, rpm)
        if batch > 1 and _take(product_id, now, rpm, batch):
            local[0], local[1] = batch - 1, mono + RESERVE_S
            return None
        local[0] = 0
        return admit_retry_after(product_id, rpm, now)

    @staticmethod
    def _batch_size(local: list[float], mono: float, rpm: int) -> int:
        """Slots worth taking at once: what this replica admitted over the last RESERVE_S."""
        elapsed = mono - local[3]
        if elapsed >= RESERVE_S:
            rate = local[2] / elapsed  # admits per second here, recently
            local[2], local[3] = 0, mono
            local[4] = max(1, min(MAX_BATCH, rpm // 60, int(rate * RESERVE_S)))
        return int(local[4])


def admit_retry_after(product_id: int, rpm: int, now: float) -> int | None:
    """One slot: None when the admit is allowed (and counted), else the seconds to wait."""
    _, tolerance = _gcra(rpm)
    wait = 0.0
    for _ in range(3):
        if _take(product_id, now, rpm, 1):
            return None
        tat = limits.tat(product_id)
        if tat is None:  # the product's first admit: its row was just made; take again
            continue
        wait = tat - tolerance - now
        if wait > 0:
            return max(1, math.ceil(wait))
        # Room after all: the row appeared (another replica made it) after our UPDATE ran.
    return max(1, math.ceil(wait))


def _gcra(rpm: int) -> tuple[float, float]:
    interval = 60.0 / rpm
    return interval, 60.0 - interval


def _take(product_id: int, now: float, rpm: int, slots: int) -> bool:
    """Take `slots` consecutive slots, all or none, in one conditional UPDATE."""
    interval, tolerance = _gcra(rpm)
    return limits.take(product_id, now, slots * interval, now + tolerance - (slots - 1) * interval)


def reset(product_id: int) -> None:
    limits.reset(product_id)
