"""Building the uvicorn server for `orch serve` (and for the benchmark's bare baseline, so
both run on the same settings).

uvicorn's httptools protocol reads request heads of any size and waits forever for a head
that never ends. `GuardedHttpToolsProtocol` subclasses it (uvicorn's `http=` setting takes a
protocol class) and adds two limits on the head only:
- more than MAX_HEAD bytes before the end of the head: 431, and the connection is closed;
- no whole head within `head_timeout_s` of its first byte (or of the connection's opening):
  the connection is closed.
The body is not counted (its own 64 KiB limit is the application's), nor the time the
application takes to answer.

`QuietServer` is uvicorn's server with its housekeeping once a second instead of ten times
(issue 11: a replica at rest should cost next to nothing). uvicorn's `main_loop` wakes every
0.1 s only to refresh the Date header (once a second) and to look at `should_exit`; here the
loop sleeps a second and a signal wakes it at once, so shutdown is no slower.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings

MAX_HEAD = 64 * 1024
_END = b"\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout_s = 10.0  # set per server by `config` (a subclass per setting)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_pending = True  # between requests, and until a head has been parsed
        self._head_seen = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_pending:
            if self._head_timer is None:
                self._arm_head_timer()
            seen = self._head_seen + len(data)
            if seen > MAX_HEAD and not self._head_ends_in_time(data):
                self._refuse_head()
                return
            self._head_seen = seen
        super().data_received(data)

    def _head_ends_in_time(self, data: bytes) -> bool:
        end = data.find(_END)
        return end >= 0 and self._head_seen + end + len(_END) <= MAX_HEAD

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._head_seen = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_pending = True  # the next bytes are the next request's head

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_pending and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no whole request head in %ss",
                             self.head_timeout_s)
            self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm_head_timer()
        self._head_pending = False
        body = b"request head over 64 KiB"
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def config(app: Any, settings: Settings, host: str | None = None, port: int | None = None,
           **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for the orchestrator (and for anything measured against it)."""
    protocol = type("HeadGuard", (GuardedHttpToolsProtocol,),
                    {"head_timeout_s": settings.head_timeout_s})
    options: dict[str, Any] = {
        "host": host or settings.host,
        "port": settings.port if port is None else port,
        "http": protocol,
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.keepalive_s,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "lifespan": "on",
        "log_config": None,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class QuietServer(uvicorn.Server):
    """uvicorn.Server, woken once a second (and by an exit signal) rather than every 0.1 s."""

    TICK_S = 1.0
    _woken: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
        counter = 0  # uvicorn's on_tick refreshes the Date header when counter % 10 == 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.TICK_S):
                    await self._woken.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._woken is not None:
            # A signal handler runs between two steps of the loop: wake it through its pipe.
            self._loop.call_soon_threadsafe(self._woken.set)


def serve(app: Any, settings: Settings, host: str | None = None, port: int | None = None) -> None:
    QuietServer(config(app, settings, host, port)).run()
