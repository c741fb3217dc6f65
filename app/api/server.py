"""Building the uvicorn server for `orch serve` (and for the benchmark's bare baseline, so
both run on the same settings).

The protocol is uvicorn's httptools one held to the contract (app/api/edge.py): head and body
timeouts, the head size limit, the concurrency limit that closes slow clients first, and every
refusal in the contract's error shape.

`QuietServer` is uvicorn's server with its housekeeping once a second instead of ten times
(a replica at rest should cost next to nothing). uvicorn's `main_loop` wakes every
0.1 s only to refresh the Date header (once a second) and to look at `should_exit`; here the
loop sleeps a second and a signal wakes it at once, so shutdown is no slower.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType
from typing import Any

import uvicorn

from app.api.edge import MAX_HEAD, GuardedHttpToolsProtocol
from app.config import Settings

__all__ = ["MAX_HEAD", "GuardedHttpToolsProtocol", "QuietServer", "config", "serve"]

def config(app: Any, settings: Settings, host: str | None = None, port: int | None = None,
           **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for the orchestrator (and for anything measured against it)."""
    protocol = type("Edge", (GuardedHttpToolsProtocol,),
                    {"head_timeout_s": settings.head_timeout_s,
                     "body_timeout_s": settings.body_timeout_s})
    options: dict[str, Any] = {
        "host": host or settings.host,
        "port": settings.port if port is None else port,
        "http": protocol,
        "ws": "none",  # no WebSocket route: an upgrade request is an ordinary request
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
