"""The blocking client (httpx.Client). Its twin is `_async.py`; both send `_calls.Call`s."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from app.client import _calls
from app.client._models import (
    Admission,
    Engine,
    EnginePage,
    Event,
    EventPage,
    Health,
    ProvisionedEngine,
    Rollout,
    Snapshot,
    SnapshotPage,
)

T = TypeVar("T")


class Client:
    """The orchestrator's API for one product (the one `platform_key` belongs to).

    Every method raises an `OrchestratorError` subclass when the server answers an error, and
    lets httpx's own errors (connection refused, timeouts) through unchanged. `request_id`
    is sent as X-Request-ID and ends up in the server's log and the engine's audit events.
    """

    def __init__(self, base_url: str, platform_key: str, *,
                 timeout: float | httpx.Timeout = _calls.DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None,
                 headers: dict[str, str] | None = None, trust_env: bool = True,
                 verify: ssl.SSLContext | str | bool = True):
        self._http = httpx.Client(
            transport=transport,
            **_calls.http_options(base_url, platform_key, timeout, headers, trust_env, verify))

    # ---- lifecycle of the client itself -----------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, call: _calls.Call[T]) -> T:
        response = self._http.request(call.method, call.path, json=call.json,
                                      content=call.content, params=call.params,
                                      headers=call.headers)
        return _calls.finish(call, response)

    # ---- engines ------------------------------------------------------------------------------

    def provision(self, user_id: str, engine_version: str | None = None, *,
                  request_id: str | None = None,
                  from_snapshot: tuple[str, str] | None = None) -> ProvisionedEngine:
        """Create the user's engine and wait until it runs; the key is shown this once.
        `from_snapshot` (user id, snapshot id): its brain starts as a copy of that snapshot,
        of an engine of the same product."""
        return self._send(_calls.provision(user_id, engine_version, request_id, from_snapshot))

    def get(self, user_id: str, *, request_id: str | None = None) -> Engine:
        return self._send(_calls.get(user_id, request_id))

    def admit(self, user_id: str, auto_provision: bool = False, auto_wake: bool = False, *,
              request_id: str | None = None, wait: bool = True) -> Admission:
        """Call on every user request. A denial is an answer (`admitted=False`), not an error.
        With `wait=False` it never waits for a boot: `reason="engine_starting"` meanwhile."""
        return self._send(_calls.admit(user_id, auto_provision, auto_wake, request_id, wait))

    def start(self, user_id: str, *, request_id: str | None = None) -> Engine:
        return self._send(_calls.start(user_id, request_id))

    def stop(self, user_id: str, *, request_id: str | None = None) -> Engine:
        return self._send(_calls.stop(user_id, request_id))

    def rotate_key(self, user_id: str, *, request_id: str | None = None) -> ProvisionedEngine:
        """A new key for a running engine; the old one is refused once this returns."""
        return self._send(_calls.rotate_key(user_id, request_id))

    def upgrade(self, user_id: str, engine_version: str, *,
                request_id: str | None = None) -> Engine:
        """Move the engine to `engine_version`, brain kept. A running engine restarts on it;
        UpgradeFailed when it was not healthy in time (the engine is back on its old one)."""
        return self._send(_calls.upgrade(user_id, engine_version, request_id))

    def snapshot(self, user_id: str, *, request_id: str | None = None) -> Snapshot:
        """Copy the engine's brain into the snapshot store now."""
        return self._send(_calls.snapshot(user_id, request_id))

    def snapshots(self, user_id: str, limit: int | None = None, cursor: str | None = None, *,
                  request_id: str | None = None) -> SnapshotPage:
        """One page of the engine's snapshots, newest first."""
        return self._send(_calls.snapshots(user_id, limit, cursor, request_id))

    def restore(self, user_id: str, snapshot_id: str, *,
                request_id: str | None = None) -> Engine:
        """Stop the engine, make its brain the snapshot's, start it again."""
        return self._send(_calls.restore(user_id, snapshot_id, request_id))

    def export_brain(self, user_id: str, snapshot_id: str | None = None, *,
                     request_id: str | None = None) -> bytes:
        """A snapshot (the newest unless named) as a tar archive."""
        return self._send(_calls.export_brain(user_id, snapshot_id, request_id))

    def import_brain(self, user_id: str, archive: bytes, *,
                     request_id: str | None = None) -> Snapshot:
        """Store a tar archive as the engine's newest snapshot; `restore` applies it."""
        return self._send(_calls.import_brain(user_id, archive, request_id))

    def destroy(self, user_id: str, *, request_id: str | None = None) -> None:
        """Remove the engine and its brain for good (the audit events are kept)."""
        self._send(_calls.destroy(user_id, request_id))

    def list(self, status: str | None = None, limit: int | None = None,
             cursor: str | None = None, *, request_id: str | None = None) -> EnginePage:
        """One page of the product's engines; see `iter_engines` for all of them."""
        return self._send(_calls.list_engines(status, limit, cursor, request_id))

    def iter_engines(self, status: str | None = None, *,
                     page_size: int | None = None) -> Iterator[Engine]:
        """Every engine of the product, following `next_cursor` page by page."""
        cursor: str | None = None
        while True:
            page = self.list(status, page_size, cursor)
            yield from page.engines
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def events(self, user_id: str, limit: int | None = None, cursor: str | None = None, *,
               request_id: str | None = None) -> EventPage:
        """One page of the engine's audit events, newest first (kept after destroy)."""
        return self._send(_calls.events(user_id, limit, cursor, request_id))

    def iter_events(self, user_id: str, *, page_size: int | None = None) -> Iterator[Event]:
        """Every audit event of the user's engine(s), newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.events(user_id, page_size, cursor)
            yield from page.events
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def watch(self, user_id: str, *, latest: int | None = None) -> Iterator[Event]:
        """The user's audit events as they happen (events?follow=true, Server-Sent Events):
        the `latest` ones first, oldest first, then each new one; endless until closed."""
        return self._follow(_calls.watch(user_id, latest))

    def _follow(self, call: _calls.Call[None]) -> Iterator[Event]:
        with self._http.stream(call.method, call.path, params=call.params,
                               headers=call.headers) as response:
            if response.is_error:
                response.read()
                _calls.finish(call, response)  # raises the error's OrchestratorError
            for line in response.iter_lines():
                event = _calls.sse_event(line)
                if event is not None:
                    yield event

    # ---- rollouts -----------------------------------------------------------------------------

    def start_rollout(self, to_version: str, *, from_version: str | None = None,
                      batch_size: int | None = None, max_failures: int | None = None,
                      request_id: str | None = None) -> Rollout:
        """Move the product's engines (those on `from_version`) to `to_version`, batch by batch."""
        return self._send(_calls.start_rollout(to_version, from_version, batch_size,
                                                max_failures, request_id))

    def rollouts(self, *, request_id: str | None = None) -> tuple[Rollout, ...]:
        return self._send(_calls.rollouts(request_id))

    def rollout(self, rollout_id: int, *, request_id: str | None = None) -> Rollout:
        return self._send(_calls.rollout(rollout_id, request_id))

    def pause_rollout(self, rollout_id: int, *, request_id: str | None = None) -> Rollout:
        return self._send(_calls.pause_rollout(rollout_id, request_id))

    def resume_rollout(self, rollout_id: int, *, request_id: str | None = None) -> Rollout:
        return self._send(_calls.resume_rollout(rollout_id, request_id))

    def abort_rollout(self, rollout_id: int, *, request_id: str | None = None) -> Rollout:
        return self._send(_calls.abort_rollout(rollout_id, request_id))

    def rollout_events(self, rollout_id: int, limit: int | None = None,
                       cursor: str | None = None, *, request_id: str | None = None) -> EventPage:
        """One page of the audit events of the rollout's engines since it started."""
        return self._send(_calls.rollout_events(rollout_id, limit, cursor, request_id))

    def watch_rollout(self, rollout_id: int, *, latest: int | None = None) -> Iterator[Event]:
        """The rollout's engines' events as they happen (endless until closed)."""
        return self._follow(_calls.watch_rollout(rollout_id, latest))

    # ---- the service --------------------------------------------------------------------------

    def healthz(self) -> Health:
        return self._send(_calls.healthz())

    def readyz(self) -> Health:
        """`ok=False` (not an exception) when the database or the scheduler is unreachable."""
        return self._send(_calls.readyz())

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        return self._send(_calls.metrics())

    def openapi(self) -> dict[str, Any]:
        return self._send(_calls.openapi())
