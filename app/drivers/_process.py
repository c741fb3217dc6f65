"""Processes of the local driver: launch in a new session, and tell whether a pid is still
the process we launched (pids are reused), even when it is not our child any more because the
orchestrator restarted and adopted it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any


def launch(cmd: list[str], env: dict[str, str], cwd: Path, log: Path,
           extra: dict[str, Any]) -> subprocess.Popen[bytes]:
    """`extra`: user, group, extra_groups and umask from the driver's Isolation."""
    # The log is ours (0600), opened before the switch: the engine writes to it through the
    # inherited descriptor and cannot open or read it.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        os.fchmod(fd, 0o600)  # a log left by an older version may be 0644
        # start_new_session: the engine gets its own process group, and outlives us.
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                **extra)


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit: the local
    driver holds a pidfd and a health connection per engine; a soft limit of 1,024 is common,
    and a check that cannot open a socket would count against a healthy engine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # some platforms refuse RLIM_INFINITY: the soft limit stays


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` in clock ticks: with the pid, a unique identity."""
    stat = _stat(pid)
    return int(stat[19]) if stat else None


def status(pid: int, started: int | None) -> str:
    """'running', 'paused' (SIGSTOPped), or 'dead' (gone, zombie, or another process now)."""
    stat = _stat(pid)
    if stat is None or (started is not None and int(stat[19]) != started):
        return "dead"
    code = stat[0]
    if code in ("Z", "X", "x"):
        return "dead"
    return "paused" if code in ("T", "t") else "running"


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def reap(pid: int) -> None:
    """Collect our child's exit status so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def engines_under(brain_root: Path, known: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Live processes whose ENGINE_BRAIN_DIR is a directory right under `brain_root`, by that
    directory's name: how engines with no registry row (or an outdated pid) are found.
    `known`: pids whose engine is known already (watched by their pidfd), by name; their
    environ is not read again (at 1,000 engines that would be most of the scan)."""
    return EngineScan().run(brain_root, known)


class EngineScan:
    """engines_under, remembering the processes found not to be engines (the orphan
    sweep reads every process on the machine, most of them other programs', every lease).

    A process is taken for "not an engine" once it was seen so twice (so not in the moment
    between a fork and the exec of an engine), and only while its /proc entry is the same one
    (its inode's ctime, set when the entry is made: a pid reused is a new entry). An engine
    found is remembered the same way (its environment is fixed at its exec): with two
    replicas, the one that sweeps would otherwise read the other's engines again every lease,
    ~50 ms of CPU a sweep for 500 of them."""

    def __init__(self) -> None:
        self._others: dict[int, int] = {}  # pid -> its /proc entry's ctime: not an engine
        self._once: dict[int, int] = {}  # seen once so
        self._engines: dict[int, tuple[int, str]] = {}  # pid -> (that ctime, engine name)

    def run(self, brain_root: Path, known: dict[int, str] | None = None) -> dict[str, list[int]]:
        known = known or {}
        found: dict[str, list[int]] = {}
        prefix = str(brain_root).rstrip("/") + "/"
        others, once, engines = {}, {}, {}
        # os.listdir and plain strings: a machine may hold thousands of processes, and pathlib's
        # objects cost more than the reads.
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in known:
                found.setdefault(known[pid], []).append(pid)
                continue
            try:
                made = os.stat(f"/proc/{pid}").st_ctime_ns
            except OSError:
                continue
            if self._others.get(pid) == made:
                others[pid] = made
                continue
            seen = self._engines.get(pid)
            if seen is not None and seen[0] == made:
                engines[pid] = seen
                found.setdefault(seen[1], []).append(pid)
                continue
            name = _engine_of(pid, prefix)
            if name is not None:
                if status(pid, None) != "dead":
                    found.setdefault(name, []).append(pid)
                    engines[pid] = (made, name)
            elif self._once.get(pid) == made:
                others[pid] = made
            else:
                once[pid] = made
        self._others, self._once, self._engines = others, once, engines  # pids gone: forgotten
        return found


_BRAIN_VAR = b"ENGINE_BRAIN_DIR="


def _engine_of(pid: int, prefix: str) -> str | None:
    """The engine name in `pid`'s ENGINE_BRAIN_DIR, if that is a directory right under the
    brain root (`prefix`)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if environ.startswith(_BRAIN_VAR):
        start = len(_BRAIN_VAR)
    else:
        at = environ.find(b"\0" + _BRAIN_VAR)
        if at < 0:
            return None
        start = at + 1 + len(_BRAIN_VAR)
    end = environ.find(b"\0", start)
    path = environ[start:end if end >= 0 else len(environ)].decode(errors="replace")
    if path.startswith(prefix) and "/" not in path[len(prefix):]:
        return path[len(prefix):]
    return None
