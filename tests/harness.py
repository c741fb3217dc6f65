"""Runs the real orchestrator (`python -m app.cli serve`) as a subprocess for tests."""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Engines' port ranges come from below the kernel's ephemeral ports (32768 and up, where
# free_port() and every outgoing connection get theirs), one band per pytest-xdist worker, so
# two workers never hand out the same range.
_BANDS = (20000, 32000)


def _band() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    width = (_BANDS[1] - _BANDS[0]) // max(1, count)
    return _BANDS[0] + index * width, _BANDS[0] + (index + 1) * width


def free_port_range(size: int) -> tuple[int, int]:
    """A block of ports that are all bindable right now, in this worker's band."""
    first, last = _band()
    for _ in range(200):
        low = random.randrange(first, last - size)
        if all(_bindable(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# The user tests run engines as unless they say otherwise: ourselves (a
# root orchestrator's default, `nobody`, cannot pass through pytest's 0700 temp dirs).
# ORCH_TEST_ENGINE_USER=nobody runs them as that user instead, under /usr/bin/python3, and
# opens each test's temp dirs for passing through (0711); README, "Security".
OWN_USER = pwd.getpwuid(os.geteuid()).pw_name
TEST_ENGINE_USER = os.environ.get("ORCH_TEST_ENGINE_USER") or OWN_USER


def _engines_as(user: str, tmp: Path) -> dict[str, str]:
    if user == OWN_USER:
        return {"ORCH_ENGINE_USER": user}
    for directory in [tmp, *tmp.parents]:
        if directory.stat().st_mode & 0o777 == 0o700 and directory.stat().st_uid == os.geteuid():
            os.chmod(directory, 0o711)
    return {"ORCH_ENGINE_USER": user, "ORCH_ENGINE_CMD": f"/usr/bin/python3 {reachable_refengine(tmp)}"}


def reachable_refengine(tmp: Path) -> Path:
    """A copy of the reference engine (standard library only, runnable by path) in `tmp`,
    world-readable: the checkout may sit where another user cannot go (a 0700 clone dir)."""
    target = tmp / "refengine-copy"
    if not target.exists():
        shutil.copytree(ROOT / "app" / "refengine", target / "app" / "refengine",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "app" / "__init__.py", target / "app" / "__init__.py")
        for path in [target, *target.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return target / "app" / "refengine"


SYSTEM_PYTHON = Path("/usr/bin/python3")  # an interpreter `nobody` can run


@contextmanager
def passable_tmp(prefix: str) -> Iterator[Path]:
    """A temp dir engines running as `nobody` can pass through (pytest's own is 0700); skips
    where engines cannot run as another user (not root, or no system interpreter)."""
    import tempfile

    import pytest

    if os.geteuid() != 0:
        pytest.skip("engines run as another user only under a root orchestrator")
    if not SYSTEM_PYTHON.exists():
        pytest.skip("needs an interpreter `nobody` can run (/usr/bin/python3) for the engine")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Orchestrator:
    """One orchestrator process on a temp state dir; restartable on the same database."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, ports: int = 20,
                 driver: str = "local"):
        self.tmp = tmp
        self.driver = driver
        self.state_dir = tmp / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        low, high = free_port_range(ports)
        self.pg_url = _fresh_postgres_database() if os.environ.get("ORCH_TEST_DB") == "postgres" else None
        self.owns_db = True
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "NOMAD_", "CONSUL_"))},
            "ORCH_STATE_DIR": str(self.state_dir),
            "ORCH_DATABASE_URL": f"sqlite:///{self.state_dir / 'orch.db'}",
            "ORCH_PORT_RANGE": f"{low}-{high}",
            "ORCH_BOOT_TIMEOUT_S": "10",
            "ORCH_STOP_GRACE_S": "3",
            "ORCH_IDLE_SLEEP_S": "0",
            "ORCH_TICK_S": "0.1",
            "ORCH_HEALTH_INTERVAL_S": "0.2",  # checks spread over this
            "ORCH_RESYNC_S": "2",
            "ORCH_HEALTH_GRACE_S": "1",
            "ORCH_RESTART_BACKOFF_S": "0.1",
            "ORCH_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            "NO_PROXY": "*",
            # Engines run as the test's own user; tests/integration/test_security.py runs them
            # as `nobody` (a root orchestrator's default) where the temp dir allows it.
            **_engines_as(TEST_ENGINE_USER, tmp),
            **(env or {}),
        }
        if self.pg_url:
            self.env["ORCH_DATABASE_URL"] = self.pg_url
        self.stack: Any = None
        if driver == "nomad":
            from tests.scheduler import scheduler_env

            self.stack, nomad_env = scheduler_env(tmp, (low, high))
            self.env.update(nomad_env)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "orch.log"
        self.keys: dict[str, str] = {}

    def replica(self) -> Orchestrator:
        """Another orchestrator process on the same database, state dir and port range."""
        other = Orchestrator.__new__(Orchestrator)
        other.tmp, other.state_dir, other.env = self.tmp, self.state_dir, dict(self.env)
        other.driver, other.stack = self.driver, None  # the scheduler is the first one's to close
        other.port, other.proc, other.keys = 0, None, self.keys
        other.pg_url, other.owns_db = self.pg_url, False
        other.log = self.tmp / f"orch-replica-{id(other)}.log"
        return other.start()

    # ---- process ----------------------------------------------------------------------------

    def start(self) -> Orchestrator:
        self.port = free_port()
        env = {**self.env, "ORCH_PORT": str(self.port)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=60, what=f"orchestrator on port {self.port} (log {self.log})")
        return self

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"orchestrator exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=0.5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def restart(self) -> Orchestrator:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        for pid in self.engine_pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        from tests.conftest import reap_zombies

        if self.stack is not None:
            self.stack.close()
        elif self.driver == "nomad" and self.owns_db:  # real agents outlive the test: scrub them
            from tests.scheduler import scrub

            scrub(self.env["NOMAD_ADDR"])
        time.sleep(0.05)
        reap_zombies()
        if self.pg_url and self.owns_db:
            _drop_postgres_database(self.pg_url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- CLI and database -------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"orch {' '.join(args)} failed: {result.stderr}")
        return result

    def product(self, name: str, max_engines: int = 100, rpm: int = 100000) -> str:
        out = self.cli("products", "create", name, "--max-engines", str(max_engines),
                       "--rate-limit-rpm", str(rpm))
        key = json.loads(out.stdout)["platform_key"]
        self.keys[name] = key
        return key

    def client(self, product: str, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Platform-Key": self.keys[product]},
                            timeout=timeout, trust_env=False)

    def db(self) -> Any:
        """A DB-API connection to the orchestrator's database, in autocommit mode."""
        if self.pg_url:
            import psycopg2

            conn = psycopg2.connect(self.pg_url)
            conn.autocommit = True
            return conn
        return sqlite3.connect(self.state_dir / "orch.db", timeout=10, isolation_level=None)

    def execute(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = self.db()
        try:
            cursor = conn.cursor()
            cursor.execute(sql.replace("?", "%s") if self.pg_url else sql, params)
            return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, *params)]

    def engine_row(self, user_id: str) -> dict[str, Any] | None:
        conn = self.db()
        try:
            cursor = conn.cursor()
            mark = "%s" if self.pg_url else "?"
            cursor.execute(f"SELECT * FROM engine WHERE user_id = {mark}", (user_id,))
            row = cursor.fetchone()
            return dict(zip([c[0] for c in cursor.description], row)) if row else None
        finally:
            conn.close()

    def engine_pids(self) -> list[int]:
        if not self.pg_url and not (self.state_dir / "orch.db").exists():
            return []
        pids = []
        for (state,) in self.rows("SELECT driver_state FROM engine"):
            pid = json.loads(state or "{}").get("pid")
            if pid:
                pids.append(pid)
        return pids


def _fresh_postgres_database() -> str:
    """A new, empty database on the server named by ORCH_TEST_POSTGRES."""
    import uuid

    import psycopg2

    server = os.environ["ORCH_TEST_POSTGRES"]
    name = f"orch_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(server)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return server.rsplit("/", 1)[0] + "/" + name


def _drop_postgres_database(url: str) -> None:
    import psycopg2

    server, name = os.environ["ORCH_TEST_POSTGRES"], url.rsplit("/", 1)[1]
    conn = psycopg2.connect(server)
    conn.autocommit = True
    conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@contextmanager
def running(tmp: Path, driver: str = "local", product: str | None = "acme",
            **kwargs: Any) -> Iterator[Orchestrator]:
    """A started orchestrator (with `product`, unless None), closed afterwards (the double with
    it); on the double, it ends by asserting that every request the driver sent was well-formed."""
    orchestrator = Orchestrator(tmp, driver=driver, **kwargs)
    try:
        orchestrator.start()
        if product:
            orchestrator.product(product)
        yield orchestrator
        if orchestrator.stack is not None:
            assert orchestrator.stack.rejections() == [], "the double refused a driver request"
    finally:
        orchestrator.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything a raw-socket client receives until the server closes the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)
