"""Nomad's event stream in the double: `GET /v1/event/stream`.

Follows Nomad v1.10.5:
- nomad/state/events.go `eventsFromChanges`/`eventFromChange`: one frame per raft apply,
  `{"Index": N, "Events": [...]}`, each event `{Topic, Type, Key, Namespace, FilterKeys,
  Index, Payload}`; an Allocation event's payload is the allocation without its Job, keyed by
  the alloc ID with the job ID as a filter key; Job and Node events are keyed by their ID.
- nomad/stream/event_buffer.go: a bounded buffer (nomad/config.go EventBufferSize, 100
  frames); `StartAtClosest`: a subscription at index N starts AT the frame of index N if it is
  still there, else at the next later one, else (N older than the buffer) at its oldest frame,
  with no error: what fell out of the buffer is silently missed; an N past the newest frame
  starts at the newest (sent again). Index 0 starts at the oldest.
- nomad/stream/subscription.go `filter`: `topic=T:K` matches the event's Key or a FilterKey;
  `T` alone is `T:*`; no topic at all is `*:*`.
- nomad/stream/ndjson.go `NewJsonStream`: a heartbeat `{}` at once, then one every interval
  (nomad/event_endpoint.go passes 30 s; `Faults.event_heartbeat_s` here, so tests can shorten it).
- command/agent/event_endpoint.go `EventStream`/`parseTopic`: a bad index or topic is 400
  text; ndjson, one frame per line; nomad/event_endpoint.go `validateNsOp`: Allocation and
  Job need namespace read-job, Node needs node read (403 before anything is streamed).

Test faults: `Faults.lose_events` (the next N frames never reach the buffer: a change only a
resync can catch) and `EventBroker.drop_all()` (every open stream is cut, as a server
restart or leader change does; clients resume from their last index).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.doubles.httputil import BadRequest

if TYPE_CHECKING:
    from tests.doubles.state import State

BUFFER_SIZE = 100  # nomad/config.go DefaultConfig EventBufferSize
HEARTBEAT = b"{}\n"


class EventBroker:
    """The buffer of frames and the open subscriptions (nomad/stream/event_broker.go)."""

    def __init__(self, state: State, size: int = BUFFER_SIZE):
        self.state = state
        self.frames: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.changed = asyncio.Event()   # replaced on every publish: wakes every subscriber
        self.generation = 0              # bumped by drop_all: streams of older ones end
        self.lost = 0                    # frames the lose_events fault swallowed

    def publish(self, topic: str, kind: str, key: str, payload: dict[str, Any],
                namespace: str = "", filter_keys: list[str] | None = None) -> None:
        """One frame at the current index (the caller has just bumped it)."""
        if self.state.faults.lose_events >= 1:
            self.state.faults.lose_events -= 1
            self.lost += 1
            return
        index = self.state.index
        event = {"Topic": topic, "Type": kind, "Key": key, "Namespace": namespace,
                 "FilterKeys": filter_keys, "Index": index, "Payload": payload}
        self.frames.append({"Index": index, "Events": [event]})
        self._wake()

    def drop_all(self) -> None:
        self.generation += 1
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def start_at(self, index: int) -> int:
        """Position in `frames` of StartAtClosest(index): that frame, or the next later one
        (the oldest one, for 0 or an index that fell out of the buffer; the newest, for an
        index past it)."""
        for pos, frame in enumerate(self.frames):
            if frame["Index"] >= index:
                return pos
        return max(0, len(self.frames) - 1)

    async def follow(self, index: int, topics: dict[str, list[str]]) -> AsyncIterator[bytes]:
        generation = self.generation
        yield HEARTBEAT
        changed = self.changed   # taken before reading the frames: a later publish sets it
        todo = list(self.frames)[self.start_at(index):]   # where the subscription starts
        seen = index - 1                                  # then: every frame after the last one
        beat = asyncio.get_running_loop().time()
        while generation == self.generation:
            for frame in todo:
                seen = frame["Index"]
                events = [e for e in frame["Events"] if _matches(e, topics)]
                if events:   # Subscription.Next skips frames the filter empties
                    yield (json.dumps({"Index": frame["Index"], "Events": events}) + "\n").encode()
            interval = self.state.faults.event_heartbeat_s
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.01, beat + interval
                                                                   - asyncio.get_running_loop().time()))
            except TimeoutError:
                beat = asyncio.get_running_loop().time()
                yield HEARTBEAT
            changed = self.changed
            todo = [f for f in self.frames if f["Index"] > seen]


def _matches(event: dict[str, Any], topics: dict[str, list[str]]) -> bool:
    keys = list(topics.get("*", [])) + list(topics.get(event["Topic"], []))
    return "*" in keys or event["Key"] in keys or any(k in keys for k in event["FilterKeys"] or [])


def parse_topics(request: Request) -> dict[str, list[str]]:
    """command/agent/event_endpoint.go parseEventTopics/parseTopic."""
    raw = request.query_params.getlist("topic")
    if not raw:
        return {"*": ["*"]}
    topics: dict[str, list[str]] = {}
    for topic in raw:
        parts = topic.split(":")
        if len(parts) > 2:
            raise BadRequest("Invalid topic query: error parsing topics: Invalid key value "
                             f"pair for topic, topic: {topic}")
        topics.setdefault(parts[0], []).append(parts[1] if len(parts) == 2 else "*")
    return topics


def parse_index(request: Request) -> int:
    raw = request.query_params.get("index") or "0"
    try:
        return int(raw)   # strconv.Atoi: a sign is allowed, anything else is not
    except ValueError:
        raise BadRequest(f'Unable to parse index: strconv.Atoi: parsing "{raw}": invalid syntax') \
            from None


def stream_response(broker: EventBroker, index: int, topics: dict[str, list[str]]) -> Response:
    return StreamingResponse(broker.follow(index, topics), media_type="application/json",
                             headers={"Cache-Control": "no-cache"})
