"""Runs the Nomad + Consul double (`python -m tests.doubles`) as a subprocess for tests.

    stack = Hashistack(tmp_path, (31000, 31009)).start()
    try:
        nomad.Nomad(address=stack.nomad, timeout=5) ...
    finally:
        stack.close()
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from app.drivers._process import engines_under, status

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0   # the double gives each task 2s, then SIGKILLs


class Hashistack:
    def __init__(self, tmp_dir: Path, port_range: tuple[int, int], nodes: int = 1,
                 dev: bool = False):
        """`dev`: a `-dev` agent's timing (a new volume ready after 1 s, checks at once), for
        tests about behaviour rather than timing: a production client's node updates add
        5-10 s to every provision. Without it, the production timing, as a real cluster."""
        self.data_dir = Path(tmp_dir).resolve() / "hashistack"
        self.port_range = port_range
        self.nodes = nodes
        self.dev = dev
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls: dict[str, str] = {}

    @property
    def nomad(self) -> str:
        return self.urls["nomad"]

    @property
    def consul(self) -> str:
        return self.urls["consul"]

    @property
    def control(self) -> str:
        return self.urls["control"]

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / "hashistack.stderr"

    def start(self) -> Hashistack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        low, high = self.port_range
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.doubles", "--data-dir", str(self.data_dir),
                 "--port-range", f"{low}-{high}", "--nodes", str(self.nodes),
                 *(["--dev"] if self.dev else [])],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            self.urls = json.loads(self._first_line())
        except BaseException:
            self.close()
            raise
        return self

    def _first_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"the double did not start: "
                                       f"{self.stderr_path.read_text(errors='replace')[-2000:]}")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        continue
                    buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    # ---- the control API -----------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        resp = httpx.request(method, self.control + path, json=body, timeout=10, trust_env=False)
        resp.raise_for_status()
        return resp.json()

    def fault(self, **flags: Any) -> dict[str, Any]:
        """Set faults (nomad_down, consul_down, ports_exhausted, memory_exhausted, task_crash,
        slow_health_s, template_delay_s, event_heartbeat_s, lose_events, fail_tasks, ...:
        state.Faults);
        returns all current faults."""
        return self._control("POST", "/faults", flags)

    def rejections(self) -> list[dict[str, Any]]:
        return self._control("GET", "/rejections")

    def clear_rejections(self) -> None:
        self._control("DELETE", "/rejections")

    def requests(self) -> list[dict[str, Any]]:
        return self._control("GET", "/requests")

    def state(self) -> dict[str, Any]:
        return self._control("GET", "/state")

    def node_lost(self, node: str | None = None) -> list[str]:
        """The node (default: every node running an allocation) goes down; the ids of the
        allocations now lost."""
        return self._control("POST", "/node-lost", {"node": node} if node else {})["lost"]

    def node_up(self, node: str | None = None) -> None:
        self._control("POST", "/node-up", {"node": node} if node else {})

    def node_resources(self, node: str | None = None, **sizes: int | str) -> dict[str, Any]:
        """Resize a node (default: every node): cpu (MHz), memory_mb, node_class; all nodes'."""
        return self._control("POST", "/node-resources", {**sizes, **({"node": node} if node else {})})

    def node_drain(self, node: str, enable: bool = True) -> None:
        self._control("POST", "/node-drain", {"node": node, "enable": enable})

    def drop_event_streams(self) -> int:
        """Cut every open /v1/event/stream; the index at that moment."""
        return int(self._control("POST", "/event-stream/drop")["index"])

    def acl(self, tokens: dict[str, dict[str, Any]] | None, enabled: bool = True) -> None:
        """Turn ACLs on with these tokens (see tests/doubles/acl.py), or off."""
        self._control("POST", "/acl", {"enabled": enabled and tokens is not None,
                                       "tokens": tokens or {}})

    # ---- stopping ------------------------------------------------------------------------

    def close(self) -> None:
        """SIGTERM the double (it stops its tasks), wait, SIGKILL it and any straggler."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        for pid in self.stragglers():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stragglers(self) -> list[int]:
        """Live processes started for this double's tasks: engines whose brain is one of its
        volumes, and anything else whose NOMAD_ALLOC_DIR is under its data dir."""
        pids = {pid for found in engines_under(self.data_dir / "volumes").values()
                for pid in found}
        prefix = (str(self.data_dir) + "/").encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            ours = any(item.startswith(b"NOMAD_ALLOC_DIR=" + prefix) for item in environ.split(b"\0"))
            if ours and status(int(entry.name), None) != "dead":
                pids.add(int(entry.name))
        return sorted(pids)

    def __enter__(self) -> Hashistack:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def served(tmp_dir: Path, port_range: tuple[int, int], nodes: int = 1,
           dev: bool = False) -> Iterator[Hashistack]:
    """A started double for a test module: closed afterwards, with no task process left behind
    and no traceback in its stderr (no bug of the double hid behind a passing test)."""
    stack = Hashistack(tmp_dir, port_range, nodes=nodes, dev=dev).start()
    try:
        yield stack
    finally:
        stack.close()
        assert not stack.stragglers()
        assert not failures(stack.stderr_path.read_text())


def failures(stderr: str) -> list[str]:
    """The exceptions tracebacks in the double's stderr end with, but a request cancelled as
    the double's ports close (uvicorn logs a blocking query or an event stream in flight at
    shutdown as cancelled): that is how a real agent's port goes too."""
    ends = re.findall(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception|Exit|Interrupt)\b.*$", stderr, re.M)
    return [line for line in ends if line.strip() != "asyncio.exceptions.CancelledError"]
