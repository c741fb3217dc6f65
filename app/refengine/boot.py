"""The reference engine's boot sequence and main(): configuration, faults, signals, listening.

The listening socket is opened before the HTTP server module is imported (importing
http.server is most of the boot time): a health check that connects meanwhile waits in the
kernel's accept queue and is answered the moment we are ready, instead of being refused and
retried after the client's back-off.
"""

from __future__ import annotations

import os
import socket
import time

from app.refengine import identity
from app.refengine.config import Config, ConfigError, complain, say
from app.refengine.signals import Signals, after, crash
from app.refengine.store import Brain, KeyStore

BACKLOG = 128  # socket's default (5) drops connections when many clients arrive at once


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As http.server does: a restart may rebind a port with connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def main(env: dict[str, str] | None = None) -> int:
    started_at = utc_now()
    try:
        config = Config.from_env(os.environ if env is None else env)
        keys = KeyStore(config.key_file)
        brain = Brain(config.brain_dir)
        config.user_id = identity.load(config.brain_dir) or config.user_id
    except ConfigError as exc:
        complain(str(exc))
        return 2
    faults = config.faults
    say(f"refengine {config.version or '-'} starting: pid {os.getpid()}, "
        f"user {config.user_id!r}, brain {config.brain_dir}")
    if faults.crash:
        say("exiting with code 3 (fault-crash)")
        return 3
    signals = Signals(keys, config)
    if faults.boot_delay_ms and signals.wait(faults.boot_delay_ms / 1000):
        say("shutdown complete")
        return 0
    try:
        sock = listen(config.host, config.port)
    except OSError as exc:
        complain(f"refengine: cannot listen on {config.host}:{config.port}: "
                 f"{exc.strerror or exc}")
        return 1

    from app.refengine import server  # the slow import, while clients already queue

    engine = server.EngineServer(sock, config, keys, brain, started_at)
    host, port = sock.getsockname()[:2]
    say(f"listening on {host}:{port}")
    if faults.crash_after_ms is not None:
        after(faults.crash_after_ms / 1000, crash, 3, f"fault-crash-after-{faults.crash_after_ms}")
    server.serve(engine, signals)
    server.shut_down(engine)
    return 0
