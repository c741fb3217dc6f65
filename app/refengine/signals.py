"""Signals of the reference engine: SIGHUP (reload the key), SIGTERM and SIGINT (stop).

They reach the main loop as bytes on a pipe (signal.set_wakeup_fd, written by the interpreter's
C-level handler the instant a signal is delivered), and the main loop acts on them in ordinary
code. So no code of ours runs inside a signal handler: a SIGHUP cannot land in the middle of a
write to stdout or while a lock is held, and it wakes the loop at once, whichever thread the
kernel delivered it to.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable

from app.refengine.config import Config, say
from app.refengine.store import KeyStore

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def after(seconds: float, action: Callable[..., object], *args: object) -> None:
    # Daemon timers: a pending one (crash-after, a delayed reload) must not delay a clean exit.
    timer = threading.Timer(seconds, action, args)
    timer.daemon = True
    timer.start()


def crash(code: int, why: str) -> None:
    """Exit at once, as a crash would: no shutdown, no cleanup."""
    say(f"exiting with code {code} ({why})")
    os._exit(code)


class Signals:
    """Install once, from the main thread, before any other thread starts."""

    def __init__(self, keys: KeyStore, config: Config):
        self.keys = keys
        self.config = config
        self.fd, write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(write_fd, False)  # set_wakeup_fd requires it: a handler never blocks
        for signum in (signal.SIGHUP, *STOP_SIGNALS):
            signal.signal(signum, _ignore)  # some Python handler, so that the pipe is written
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def handle(self) -> bool:
        """Act on the signals that arrived; True when one of them asks us to stop."""
        try:
            arrived = os.read(self.fd, 512)
        except BlockingIOError:
            return False
        stop = False
        for signum in arrived:
            if signum == signal.SIGHUP:
                delay = self.config.faults.hup_delay_ms
                if delay:
                    after(delay / 1000, self.keys.reload)
                else:
                    self.keys.reload()
            elif signum in STOP_SIGNALS:
                name = signal.Signals(signum).name
                if self.config.faults.hang_term:
                    say(f"ignoring {name}")
                elif not stop:
                    say(f"received {name}")
                    stop = True
        return stop

    def wait(self, seconds: float) -> bool:
        """Sleep, acting on signals meanwhile; True when told to stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0] and self.handle():
                return True
        return False


def _ignore(signum: int, frame: object) -> None:
    pass  # the wakeup pipe carries the signal to the main loop
