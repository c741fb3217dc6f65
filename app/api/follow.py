"""`events?follow=true` (an engine's, a rollout's): audit events as Server-Sent Events.

First the latest events (oldest first), then each new one as it is written, one `data:` line
of the event's JSON each, with the event id as the SSE `id`. New events are read from the
database rather than from this process's publish hook, so a follower sees what every replica
writes; POLL_S bounds the delay. sse-starlette frames the stream, sends a comment line every
PING_S seconds so that proxies keep it open, and ends it when the client goes away or the
server shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent

from app import registry

POLL_S = 0.2
PING_S = 15

Shape = Callable[[Any], Any]  # an Event row -> the API's Event struct
Recent = Callable[[int], list[Any]]  # the latest n events, newest first
Newer = Callable[[int], list[Any]]  # the events after an id, oldest first


def follow(recent: Recent, newer: Newer, latest: int, shape: Shape) -> EventSourceResponse:
    return EventSourceResponse(_stream(recent, newer, latest, shape), ping=PING_S)


def engine_events(product_id: int, user_id: str) -> tuple[Recent, Newer]:
    return (lambda n: registry.events_page(product_id, user_id, None, n),
            lambda last: registry.events_after(product_id, user_id, last))


async def _stream(recent: Recent, newer: Newer, latest: int,
                  shape: Shape) -> AsyncIterator[ServerSentEvent]:
    shown = recent(latest)
    last = shown[0].id if shown else _newest_id(recent)
    for event in reversed(shown):
        yield _sse(event, shape)
    while True:
        await asyncio.sleep(POLL_S)
        for event in newer(last):
            last = event.id
            yield _sse(event, shape)


def _newest_id(recent: Recent) -> int:
    newest = recent(1)
    return newest[0].id if newest else 0


def _sse(event: Any, shape: Shape) -> ServerSentEvent:
    return ServerSentEvent(data=msgspec.json.encode(shape(event)).decode(), id=str(event.id))
