"""`orch rollout status --follow`: a rollout's live progress bar.

The bar is fed by the server's Server-Sent Events stream of the rollout
(`GET /rollouts/{id}/events?follow=true`) when the CLI can reach a server: each event of the
rollout's engines is printed above the bar and redraws it from `GET /rollouts/{id}`. The
rollout's own end (succeeded, rolled back) is no engine's event, so without an event for
REFRESH_S the rollout is read again anyway. The stream starts with the rollout's latest
HISTORY events, so a rollout that has already ended shows how it went too. The API needs
the product's platform key: the CLI takes it from ORCH_PLATFORM_KEY (an environment
variable, so it shows in no process listing), and the server's address from `--url`, else
ORCH_HOST and ORCH_PORT as `orch serve` reads them.

Without a key, or when the server cannot be reached, refuses the key, or drops the stream,
the bar follows the database instead (read every POLL_S), saying so on stderr.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable

import httpx

from app import registry
from app.client import Client, Event, OrchestratorError

FINISHED = ("succeeded", "failed", "rolled_back", "aborted")
POLL_S = 0.5
REFRESH_S = 1.0
DRAIN_S = 5.0  # spent only while events the rollout wrote are still missing
CONNECT_S = 5.0
HISTORY = 100  # events of the rollout shown from before the bar started

Draw = Callable[[str, int, int, int], None]  # status, total, upgraded, failed
Say = Callable[[str], None]  # a line above the bar
Events = queue.Queue[Event | BaseException]  # from the stream's reader thread


def follow(rollout_id: int, url: str, platform_key: str | None) -> None:
    """Until the rollout ends: from the server's stream when possible, else the database."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    columns = (TextColumn("rollout {task.fields[id]} {task.fields[status]}"), BarColumn(),
               TextColumn("{task.fields[upgraded]} upgraded, {task.fields[failed]} failed, "
                          "{task.fields[remaining]} remaining"))
    with Progress(*columns, console=Console(), transient=False) as bar:
        task = bar.add_task("rollout", total=None, id=rollout_id, status="", upgraded=0,
                            failed=0, remaining=0)

        def draw(status: str, total: int, upgraded: int, failed: int) -> None:
            done = upgraded + failed
            bar.update(task, total=max(total, 1), completed=done, status=status,
                       upgraded=upgraded, failed=failed, remaining=total - done)

        if platform_key is None:
            _note("no ORCH_PLATFORM_KEY: following the database")
        elif _from_server(rollout_id, url, platform_key, draw, bar.console.print):
            return
        _from_database(rollout_id, draw)


def _from_server(rollout_id: int, url: str, key: str, draw: Draw, say: Say) -> bool:
    """True once the rollout has ended; False when the server cannot be followed (said why)."""
    events: Events = queue.Queue()
    timeout = httpx.Timeout(CONNECT_S, read=None)  # the stream is quiet between events
    try:
        with Client(url, key, timeout=CONNECT_S, trust_env=False) as api, \
                Client(url, key, timeout=timeout, trust_env=False) as stream:
            _draw_from(api, rollout_id, draw)  # the key and the id, checked before streaming
            threading.Thread(target=_read, args=(stream, rollout_id, events), daemon=True).start()
            _note(f"following the event stream of {url}")
            return _show(api, rollout_id, events, draw, say)
    except (httpx.HTTPError, OrchestratorError) as exc:
        _note(f"cannot follow {url} ({_why(exc)}): following the database")
        return False


def _show(api: Client, rollout_id: int, events: Events, draw: Draw, say: Say) -> bool:
    """Each event as it comes, the bar redrawn after it (or after a quiet REFRESH_S), until
    the rollout has ended; then the events it wrote before its end that the stream has not
    brought yet (the server reads the database every 0.2 s), for at most DRAIN_S."""
    shown = 0
    while True:
        item = _next(events, REFRESH_S)
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            say(_line(item))
            shown = item.id
        if _draw_from(api, rollout_id, draw):
            break
    newest = api.rollout_events(rollout_id, limit=1).events
    deadline = time.monotonic() + DRAIN_S
    while newest and shown < newest[0].id:
        item = _next(events, deadline - time.monotonic())
        if not isinstance(item, Event):
            break  # the stream is gone or slow: the bar already says how it ended
        say(_line(item))
        shown = item.id
    return True


def _next(events: Events, timeout: float) -> Event | BaseException | None:
    try:
        return events.get(timeout=max(timeout, 0.0))
    except queue.Empty:
        return None


def _read(stream: Client, rollout_id: int, events: Events) -> None:
    """The stream's events into the queue; its end or failure too (as an exception)."""
    try:
        for event in stream.watch_rollout(rollout_id, latest=HISTORY):
            events.put(event)
        events.put(httpx.ReadError("the server ended the stream"))
    except BaseException as exc:  # noqa: BLE001 - handed over to the main thread
        events.put(exc)


def _draw_from(api: Client, rollout_id: int, draw: Draw) -> bool:
    rollout = api.rollout(rollout_id)
    draw(rollout.status, rollout.total, rollout.upgraded, rollout.failed)
    return rollout.status in FINISHED


def _from_database(rollout_id: int, draw: Draw) -> None:
    while True:
        rollout = registry.rollouts.reload_rollout(rollout_id)
        counts = registry.rollouts.summary(rollout_id)
        draw(rollout.status if rollout else "gone", counts["total"], counts["upgraded"],
             counts["failed"])
        if rollout is None or rollout.status in FINISHED:
            return
        time.sleep(POLL_S)


def _line(event: Event) -> str:
    reason = f" ({event.reason})" if event.reason else ""
    return f"{event.engine}: {event.event}{reason}"


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OrchestratorError) else type(exc).__name__


def _note(text: str) -> None:
    print(f"orch: {text}", file=sys.stderr)


def server_url(host: str, port: int) -> str:
    """Where `orch serve` listens with these settings, as a client reaches it."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

