"""Process exits as events: one pidfd per engine, read by the event loop.

A pidfd (Linux >= 5.3) becomes readable when its process ends, whether it is our child or an
engine adopted after a restart of the orchestrator, so a crash is seen the moment it happens
without polling anything. The pid's kernel start time is checked after opening the pidfd: a
pid that was reused by another process counts as already exited.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from app.drivers import _process

log = logging.getLogger("orch.exits")

Listener = Callable[[str], None]


class ExitWatcher:
    def __init__(self) -> None:
        self._watched: dict[str, tuple[int, int]] = {}  # engine name -> (pid, pidfd)
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def watching(self, name: str) -> int | None:
        """The pid watched for `name`, if any."""
        entry = self._watched.get(name)
        return entry[0] if entry else None

    def pids(self) -> dict[int, str]:
        """Every watched pid, with its engine's name (a copy: safe to read from a thread)."""
        return {pid: name for name, (pid, _) in self._watched.items()}

    def watch(self, name: str, pid: int, started: int | None) -> None:
        """Call the listeners with `name` when process `pid` (started at `started`) ends.
        Idempotent; a new pid for `name` replaces the old one (a restart)."""
        loop = self._current_loop()
        entry = self._watched.get(name)
        if entry is not None and entry[0] == pid:
            return
        self.forget(name)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            loop.call_soon(self._exited, name, pid, None)
            return
        # Opened after the pid was read from the row: make sure it is still the same process.
        if _process.status(pid, started) == "dead":
            os.close(fd)
            loop.call_soon(self._exited, name, pid, None)
            return
        self._watched[name] = (pid, fd)
        loop.add_reader(fd, self._exited, name, pid, fd)

    def forget(self, name: str) -> None:
        entry = self._watched.pop(name, None)
        if entry is not None:
            self._close(entry[1])

    def close(self) -> None:
        for name in list(self._watched):
            self.forget(name)

    def _current_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (tests run one per scenario): the old one's readers are gone.
            for _, fd in self._watched.values():
                os.close(fd)
            self._watched.clear()
            self._loop = loop
        return loop

    def _close(self, fd: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)

    def _exited(self, name: str, pid: int, fd: int | None) -> None:
        if fd is not None and self._watched.get(name) == (pid, fd):
            del self._watched[name]
            self._close(fd)
        _process.reap(pid)  # our child: no zombie left behind
        for listener in self._listeners:
            try:
                listener(name)
            except Exception:
                log.exception("exit listener failed for %s", name)
