"""The audit log, and the transitions published to whoever listens (metrics, logs).

Subscribers are called after the transaction that wrote the event committed. The registry
imports neither metrics nor logs: the service's start-up subscribes them (app.api.app), so
there is no import cycle and importing a module subscribes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.registry.db import request_id_var
from app.registry.models import Event

log = logging.getLogger("orch.registry")


@dataclass(frozen=True, slots=True)
class Transition:
    engine: str  # the engine's name
    user_id: str
    event: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    request_id: str | None


Subscriber = Callable[[Transition], None]
_subscribers: list[Subscriber] = []


def subscribe(fn: Subscriber) -> None:
    if fn not in _subscribers:
        _subscribers.append(fn)


def publish(transition: Transition) -> None:
    for fn in _subscribers:
        try:
            fn(transition)
        except Exception:
            log.exception("transition subscriber failed")


def audit(product_id: int, user_id: str, engine_name: str, event: str, src: str | None,
          dst: str | None, reason: str | None, now: float, engine_id: int | None = None) -> Transition:
    """Write one audit event (inside the caller's transaction); publish it after commit."""
    request_id = request_id_var.get()
    Event.create(product_id=product_id, user_id=user_id, engine_name=engine_name,
                 engine_id=engine_id, at=now, event=event, from_status=src, to_status=dst,
                 reason=reason[:256] if reason else None, request_id=request_id)
    return Transition(engine_name, user_id, event, src, dst, reason, request_id)


def record_orphan_removed(name: str) -> None:
    publish(audit(0, "", name, "orphan_removed", None, None, "no registry row", time.time()))


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


def events_after(product_id: int, user_id: str, after_id: int, limit: int = 100) -> list[Event]:
    """A user's events newer than `after_id`, oldest first (a follower's next ones)."""
    query = Event.select().where((Event.product_id == product_id) & (Event.user_id == user_id)
                                 & (Event.id > after_id))
    return list(query.order_by(Event.id).limit(limit))
