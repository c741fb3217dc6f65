"""Single-flight per engine, inside one process.

A second caller of the same operation on the same engine joins the one in flight and gets its
result; a different operation waits its turn (one operation per engine at a time). Operations
run as tasks of their own, so a client that hangs up does not cancel a half-done operation.
Across replicas the same exclusion comes from the lease on the engine's row (runner.lease).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class _Slot:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.pending: dict[str, asyncio.Future[Any]] = {}


class Flights:
    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot] = {}

    async def run(self, key: Hashable, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        slot = self._slots.setdefault(key, _Slot())
        future = slot.pending.get(op)
        if future is None:
            future = asyncio.ensure_future(self._run(key, slot, op, fn))
            # A caller that stopped waiting (admit's deadline) leaves it running; its outcome
            # is still retrieved, so nothing is logged as "never retrieved".
            future.add_done_callback(_retrieve)
            slot.pending[op] = future
        return await asyncio.shield(future)

    def all(self) -> list[asyncio.Future[Any]]:
        return [f for slot in self._slots.values() for f in slot.pending.values()]

    def current(self, key: Hashable) -> list[asyncio.Future[Any]]:
        slot = self._slots.get(key)
        return list(slot.pending.values()) if slot else []

    async def _run(self, key: Hashable, slot: _Slot, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with slot.lock:
                return await fn()
        finally:
            slot.pending.pop(op, None)
            if not slot.pending and self._slots.get(key) is slot:
                del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
