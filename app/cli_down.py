"""`orch down`, and what `orch serve` says it leaves running when it stops.

While it serves, `orch serve` is registered in its state dir: `servers/<pid>` holds its pid and
the kernel's start time of that pid, so a pid reused by another process is never signalled.
`orch down`:
1. ends every server registered there (SIGTERM; SIGKILL after `server_wait`), first, so no
   reconciler restarts or wakes what comes next;
2. ends every engine's process, brain kept, and leaves each running or sleeping engine
   sleeping (app/cli_ops.py `down`, app/CONTRACT.md "Down"): the next admit with auto_wake
   cold-starts it.

Ctrl-C on `orch serve` (and `make run`) stops the server only, and says so: engines outlive
the orchestrator by design, so a restart or an upgrade of it is adopted by the engines' users
without their engines stopping. `orch down` is the way to stop everything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from app import cli_ops, registry, statedir
from app.cli_output import show_for as show
from app.config import Settings
from app.drivers import _process

DOWN_COLUMNS = ("product", "user_id", "was", "status", "error")
POLL_S = 0.1


class _Stopped(Exception):
    pass


def _stopped(sig: int, _frame: FrameType | None) -> None:
    raise _Stopped(sig)


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[None]:
    """Registered in the state dir while serving; on the way out, what keeps running.

    uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises the signal again under the
    handlers it found: these end the command here, so the note is said and the exit status is
    0 (a stop that was asked for) rather than a traceback or a death by signal."""
    entry = _servers(settings) / str(os.getpid())
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry.write_text(f"{os.getpid()} {_process.start_time(os.getpid())}\n")
    handlers = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        entry.unlink(missing_ok=True)
        _say_what_keeps_running()


def _say_what_keeps_running() -> None:
    try:
        live = cli_ops.live(registry.engine_counts())
    except Exception:  # noqa: BLE001 - a note on the way out; the database may be gone
        live = None
    if live == {}:
        _note("the server has stopped; no engine is running")
        return
    if live is None:
        what = "its engines keep"
    else:
        total = sum(live.values())
        what = f"{total} engine{'s' if total > 1 else ''} (" + ", ".join(
            f"{status}: {n}" for status, n in sorted(live.items())) + ") keep"
    _note(f"the server has stopped; {what} running, and the next `orch serve` adopts them. "
          "To stop them too, brains kept: orch down (or make down)")


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    for pid in stop_servers(settings):
        _note(f"stopped the server (pid {pid})")
    database = statedir.sqlite_path(settings)
    if database is not None and not database.exists():
        _note("no database here: no engines to stop")
        show(args, [], DOWN_COLUMNS)
        return cli_ops.OK
    results = cli_ops.down(settings)
    show(args, results, DOWN_COLUMNS)
    return cli_ops.UNAVAILABLE if any("error" in r for r in results) else cli_ops.OK


def stop_servers(settings: Settings) -> list[int]:
    """End every server registered in this state dir; the pids that were ended."""
    servers = _servers(settings)
    found = []
    for entry in sorted(servers.iterdir()) if servers.is_dir() else []:
        pid, started = _read(entry)
        if pid is None or _process.status(pid, started) == "dead":
            entry.unlink(missing_ok=True)  # a server that was killed, or a reused pid
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        found.append((pid, started, entry))
    deadline = time.monotonic() + server_wait(settings)
    for pid, started, entry in found:
        while _process.status(pid, started) != "dead" and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if _process.status(pid, started) != "dead":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its leases run out; the operations settle them
        entry.unlink(missing_ok=True)
    return [pid for pid, _, _ in found]


def server_wait(settings: Settings) -> float:
    """A server finishes the requests it has begun before it exits; an admit may wait for a
    boot, and a stop for its grace."""
    return settings.boot_timeout_s + settings.stop_grace_s + 5.0


def _servers(settings: Settings) -> Path:
    return settings.state_dir / "servers"


def _read(entry: Path) -> tuple[int | None, int | None]:
    try:
        pid, started = entry.read_text().split()
        return int(pid), (None if started == "None" else int(started))
    except (OSError, ValueError):
        return None, None


def _note(text: str) -> None:
    print(f"orch: {text}", file=sys.stderr)
