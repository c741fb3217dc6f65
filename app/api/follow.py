"""`GET /engines/{user_id}/events?follow=true`: the audit trail as Server-Sent Events (issue 13).

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


def follow(product_id: int, user_id: str, latest: int, shape: Shape) -> EventSourceResponse:
    return EventSourceResponse(_stream(product_id, user_id, latest, shape), ping=PING_S)


async def _stream(product_id: int, user_id: str, latest: int,
                  shape: Shape) -> AsyncIterator[ServerSentEvent]:
    recent = registry.events_page(product_id, user_id, None, latest)
    last = recent[0].id if recent else _newest_id(product_id, user_id)
    for event in reversed(recent):
        yield _sse(event, shape)
    while True:
        await asyncio.sleep(POLL_S)
        for event in registry.events_after(product_id, user_id, last):
            last = event.id
            yield _sse(event, shape)


def _newest_id(product_id: int, user_id: str) -> int:
    newest = registry.events_page(product_id, user_id, None, 1)
    return newest[0].id if newest else 0


def _sse(event: Any, shape: Shape) -> ServerSentEvent:
    return ServerSentEvent(data=msgspec.json.encode(shape(event)).decode(), id=str(event.id))
