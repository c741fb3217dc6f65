"""The reference engine (`python -m app.refengine`) as a real process on a loopback port: the
engine contract, its brain, key rotation, signals and the fault knobs the other suites use."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # where free_port() looks, too
KEY = "key-one"
BOOT_S = 10.0  # generous: a loaded CI machine; a healthy boot takes ~50 ms


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    return wait_for(predicate, timeout, 0.01, what)


class Engine:
    """One engine process, its files, and a client for it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, brain: Path, key_file: Path,
                 log: Path):
        self.proc, self.port, self.brain, self.key_file, self.log = proc, port, brain, key_file, log
        self.url = f"http://{HOST}:{port}"
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=5.0)

    def call(self, method: str, path: str, key: str | None = KEY, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return self.http.request(method, path, headers=headers, **kwargs)

    def raw(self, method: str, path: str, body: bytes = b"", key: str = KEY) -> tuple[int, bytes]:
        """A request with its path exactly as given (httpx would normalise `..` away)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def health(self) -> int | None:
        try:
            return self.http.get("/health").status_code
        except httpx.TransportError:
            return None

    def text(self) -> str:
        return self.log.read_text()

    def wait_exit(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Start engines in tmp_path; every one is killed and reaped at the end, whatever happens."""
    engines: list[Engine] = []

    def launch(version: str = "ref-1.0", *, brain: Path | None = None, key: str = KEY,
               ready: bool = True, env: dict[str, str] | None = None) -> Engine:
        n = len(engines)
        brain = brain or tmp_path / "brain"
        key_file = tmp_path / f"key{n}"
        key_file.write_text(key + "\n")
        port = free_port()
        log = tmp_path / f"engine{n}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_PORT": str(port),
                    "ENGINE_BRAIN_DIR": str(brain), "ENGINE_API_KEY_FILE": str(key_file),
                    "ENGINE_USER_ID": "alice", "ENGINE_VERSION": version, **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "app.refengine"], env=full_env,
                                    cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        engine = Engine(proc, port, brain, key_file, log)
        engines.append(engine)
        if ready:
            wait_until(lambda: engine.health() == 200 or proc.poll() is not None, BOOT_S, "boot")
            assert proc.poll() is None, engine.text()
        return engine

    yield launch
    for engine in engines:
        engine.http.close()
        if engine.proc.poll() is None:
            engine.proc.kill()
        engine.proc.wait(timeout=10)


def run_to_exit(env: dict[str, str], timeout: float = BOOT_S) -> subprocess.CompletedProcess[str]:
    """The engine with exactly `env` (plus PYTHONPATH), for the ways it refuses to start."""
    return subprocess.run([sys.executable, "-m", "app.refengine"], capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
                          timeout=timeout)


# ---- the contract ---------------------------------------------------------------------------

def test_health_info_and_log(start: Callable[..., Engine], tmp_path: Path) -> None:
    engine = start()
    r = engine.call("GET", "/health", key=None)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert f"listening on {HOST}:{engine.port}" in engine.text()
    info = engine.call("GET", "/v1/info").json()
    assert info["user_id"] == "alice" and info["version"] == "ref-1.0"
    assert info["pid"] == engine.proc.pid and info["started_at"].endswith("Z")
    assert stat.S_IMODE((tmp_path / "brain").stat().st_mode) == 0o700  # created, private


def test_every_route_but_health_needs_the_key(start: Callable[..., Engine]) -> None:
    engine = start()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/keycheck"), ("GET", "/v1/info"), ("GET", "/nowhere"),
                             ("PUT", "/v1/memory/a"), ("POST", "/v1/admin/exit")):
            r = engine.http.request(method, path, headers=headers, json={"code": 1})
            assert r.status_code == 401 and r.json() == {"error": "unauthorized"}, (headers, path)
    ok = engine.call("GET", "/v1/keycheck")
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    assert engine.call("GET", "/nowhere").status_code == 404  # a valid key: not 401
    assert engine.call("POST", "/v1/keycheck").status_code == 405
    assert engine.proc.poll() is None  # the refused admin/exit did nothing


def test_memory_round_trip_survives_a_restart(start: Callable[..., Engine], tmp_path: Path) -> None:
    engine = start()
    value = bytes(range(256)) * 4
    assert engine.call("GET", "/v1/memory/notes").status_code == 404
    assert engine.call("PUT", "/v1/memory/notes", content=value).status_code == 200
    got = engine.call("GET", "/v1/memory/notes")
    assert got.status_code == 200 and got.content == value
    assert got.headers["content-type"] == "application/octet-stream"
    assert engine.call("PUT", "/v1/memory/caf%C3%A9", content=b"").status_code == 200
    assert engine.call("GET", "/v1/memory/café").content == b""
    assert engine.call("PUT", "/v1/memory/gone", content=b"x").status_code == 200
    assert engine.call("DELETE", "/v1/memory/gone").status_code == 204
    assert engine.call("DELETE", "/v1/memory/gone").status_code == 404
    assert engine.call("GET", "/v1/memory/gone").status_code == 404

    engine.signal(signal.SIGTERM)
    assert engine.wait_exit() == 0
    again = start(brain=tmp_path / "brain")  # a new process on the same brain
    assert again.call("GET", "/v1/memory/notes").content == value
    assert again.call("GET", "/v1/memory/café").status_code == 200
    assert again.call("GET", "/v1/memory/gone").status_code == 404


def test_a_pooled_engine_learns_its_user_once_and_keeps_it(start: Callable[..., Engine],
                                                          tmp_path: Path) -> None:
    engine = start(env={"ENGINE_USER_ID": ""})
    assert engine.call("GET", "/v1/info").json()["user_id"] == ""
    assert engine.http.put("/v1/identity", json={"user_id": "bob"}).status_code == 401
    assert engine.call("PUT", "/v1/identity", json={"user_id": ""}).status_code == 400
    told = engine.call("PUT", "/v1/identity", json={"user_id": "bob"})
    assert told.status_code == 200 and told.json() == {"user_id": "bob"}
    assert engine.call("PUT", "/v1/identity", json={"user_id": "bob"}).status_code == 200
    assert engine.call("PUT", "/v1/identity", json={"user_id": "eve"}).status_code == 409
    assert engine.call("GET", "/v1/info").json()["user_id"] == "bob"
    engine.signal(signal.SIGTERM)
    assert engine.wait_exit() == 0
    again = start(brain=tmp_path / "brain", env={"ENGINE_USER_ID": ""})  # restarted as pooled
    assert again.call("GET", "/v1/info").json()["user_id"] == "bob"


def test_memory_limits(start: Callable[..., Engine]) -> None:
    engine = start()
    mib = 1024 * 1024
    assert engine.call("PUT", "/v1/memory/big", content=b"b" * mib).status_code == 200
    too_big = engine.call("PUT", "/v1/memory/big", content=b"b" * (mib + 1))
    assert too_big.status_code == 413
    assert len(engine.call("GET", "/v1/memory/big").content) == mib  # the old value stays
    for name in ("k" * 200, "é" * 200):  # the longest keys, ASCII and not
        assert engine.call("PUT", f"/v1/memory/{name}", content=name.encode()).status_code == 200
        assert engine.call("GET", f"/v1/memory/{name}").content == name.encode()
    assert engine.call("PUT", "/v1/memory/" + "k" * 201, content=b"x").status_code == 400
    assert engine.call("PUT", "/v1/memory/%FF", content=b"x").status_code == 400  # not UTF-8
    assert engine.call("GET", "/v1/memory/").status_code == 400
    assert engine.call("POST", "/v1/memory/k", content=b"x").status_code == 405
    assert not [p for p in engine.brain.iterdir() if p.name.startswith(".tmp")]


def test_memory_keys_cannot_leave_the_brain(start: Callable[..., Engine], tmp_path: Path) -> None:
    engine = start()
    attempts = ["/v1/memory/../../escape", "/v1/memory/..%2F..%2Fescape",
                "/v1/memory/%2e%2e%2f%2e%2e%2fescape", "/v1/memory/%2Ftmp%2Fescape",
                "/v1/memory/a/../../../escape", "/v1/memory/..", "/v1/memory/%00escape",
                "/v1/memory/..\\..\\escape"]
    for n, path in enumerate(attempts):
        status, _ = engine.raw("PUT", path, body=f"value {n}".encode())
        assert status == 200, path
        assert engine.raw("GET", path) == (200, f"value {n}".encode())  # a key like any other
    outside = [p for p in tmp_path.rglob("*") if "escape" in p.name]
    assert outside == [] and not Path("/tmp/escape").exists()
    files = list(engine.brain.iterdir())
    keys = {unquote(path[len("/v1/memory/"):]) for path in attempts}  # some are aliases
    assert len(files) == len(keys) == 6
    assert all(p.parent == engine.brain and p.is_file() and p.name[:2] in ("m-", "h-")
               for p in files)
    for path in attempts:
        assert engine.raw("DELETE", path)[0] in (204, 404)
    assert list(engine.brain.iterdir()) == []


def test_concurrent_writes_of_one_key_never_mix(start: Callable[..., Engine]) -> None:
    engine = start()
    values = [bytes([n]) * 65536 for n in range(8)]
    errors: list[BaseException] = []

    def writer(value: bytes) -> None:
        try:
            with httpx.Client(base_url=engine.url, trust_env=False, timeout=5) as client:
                for _ in range(10):
                    r = client.put("/v1/memory/shared", content=value,
                                   headers={"Authorization": f"Bearer {KEY}"})
                    assert r.status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert engine.call("GET", "/v1/memory/shared").content in values
    assert [p.name for p in engine.brain.iterdir() if not p.name.startswith("m-")] == []


# ---- key rotation and signals ---------------------------------------------------------------

def test_sighup_rotates_the_key(start: Callable[..., Engine]) -> None:
    engine = start()
    engine.key_file.write_text("  key-two\n")  # surrounding whitespace is not part of the key
    engine.signal(signal.SIGHUP)
    wait_until(lambda: engine.call("GET", "/v1/keycheck", key="key-two").status_code == 200,
               timeout=2, what="the new key")
    assert engine.call("GET", "/v1/keycheck", key=KEY).status_code == 401
    assert "reloaded key" in engine.text()

    engine.key_file.write_text("")  # a broken rotation must not lock everyone out
    engine.signal(signal.SIGHUP)
    wait_until(lambda: "key reload failed" in engine.text(), timeout=2, what="the failed reload")
    assert engine.call("GET", "/v1/keycheck", key="key-two").status_code == 200
    assert "key-two" not in engine.text() and KEY not in engine.text()  # keys never logged


def test_sigterm_stops_cleanly_after_in_flight_requests(start: Callable[..., Engine]) -> None:
    engine = start()
    # A request whose body is still arriving when SIGTERM comes must still be answered.
    with socket.create_connection((HOST, engine.port), timeout=5) as sock:
        sock.sendall(f"PUT /v1/memory/late HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Length: 10\r\n\r\n12345".encode())
        wait_until(lambda: engine.health() == 200, what="the server to reach the request")
        time.sleep(0.1)  # the handler thread is now reading the body
        engine.signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM" in engine.text(), what="SIGTERM logged")
        sock.sendall(b"67890")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    assert engine.wait_exit() == 0
    log = engine.text()
    assert log.index("received SIGTERM") < log.index("shutdown complete")
    assert engine.health() is None  # nothing listens any more
    assert (engine.brain / ("m-" + b"late".hex())).read_bytes() == b"1234567890"


def test_admin_exit(start: Callable[..., Engine]) -> None:
    engine = start()
    for bad in ({"code": True}, {"code": 300}, {"code": "1"}, {}, [1]):
        assert engine.call("POST", "/v1/admin/exit", json=bad).status_code == 400, bad
    assert engine.call("POST", "/v1/admin/exit", content=b"{not json").status_code == 400
    r = engine.call("POST", "/v1/admin/exit", json={"code": 7})
    assert r.status_code == 202
    assert engine.wait_exit() == 7


def test_admin_health(start: Callable[..., Engine]) -> None:
    engine = start()
    assert engine.call("POST", "/v1/admin/health", json={"healthy": False}).status_code == 200
    r = engine.call("GET", "/health", key=None)
    assert r.status_code == 503 and r.json() == {"status": "unhealthy"}
    assert engine.call("POST", "/v1/admin/health", json={"healthy": "no"}).status_code == 400
    assert engine.call("POST", "/v1/admin/health", json={"healthy": True}).status_code == 200
    assert engine.health() == 200


# ---- fault knobs ----------------------------------------------------------------------------

def test_fault_crash_exits_3_before_listening(start: Callable[..., Engine]) -> None:
    engine = start("ref-1.0+fault-crash", ready=False)
    assert engine.wait_exit() == 3
    assert "listening" not in engine.text() and engine.health() is None


def test_fault_never_healthy(start: Callable[..., Engine]) -> None:
    engine = start("ref+fault-never-healthy", ready=False)
    wait_until(lambda: "listening on" in engine.text(), BOOT_S, "listening")
    assert engine.health() == 503
    assert engine.call("POST", "/v1/admin/health", json={"healthy": True}).status_code == 200
    assert engine.health() == 503  # always
    assert engine.call("GET", "/v1/keycheck").status_code == 200  # the rest works


def test_fault_hang_term_needs_sigkill(start: Callable[..., Engine]) -> None:
    engine = start("ref+fault-hang-term")
    engine.signal(signal.SIGTERM)
    wait_until(lambda: "ignoring SIGTERM" in engine.text(), what="SIGTERM ignored")
    with pytest.raises(subprocess.TimeoutExpired):
        engine.wait_exit(timeout=0.3)
    assert engine.health() == 200
    engine.signal(signal.SIGKILL)
    assert engine.wait_exit() == -signal.SIGKILL
    assert "shutdown complete" not in engine.text()


def test_boot_delay_and_sigterm_during_it(start: Callable[..., Engine]) -> None:
    began = time.monotonic()
    engine = start("ref+boot-delay-300+fault-unknown")  # unknown tokens are ignored
    assert time.monotonic() - began >= 0.3
    waiting = start("ref+boot-delay-5000", ready=False)
    wait_until(lambda: "starting" in waiting.text(), BOOT_S, "start-up")
    assert waiting.health() is None  # not listening yet
    waiting.signal(signal.SIGTERM)
    assert waiting.wait_exit() == 0  # well before the 5 s
    assert "shutdown complete" in waiting.text()
    assert engine.health() == 200


def test_fault_crash_after(start: Callable[..., Engine]) -> None:
    engine = start("ref+fault-crash-after-300")
    assert engine.health() == 200  # healthy first
    assert engine.wait_exit() == 3


def test_hup_delay_applies_the_reload_later(start: Callable[..., Engine]) -> None:
    engine = start("ref+hup-delay-300")
    engine.key_file.write_text("key-two")
    engine.signal(signal.SIGHUP)
    assert engine.call("GET", "/v1/keycheck", key=KEY).status_code == 200  # not yet
    wait_until(lambda: engine.call("GET", "/v1/keycheck", key="key-two").status_code == 200,
               timeout=3, what="the delayed reload")


# ---- refusing to start ----------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["ENGINE_PORT", "ENGINE_BRAIN_DIR", "ENGINE_API_KEY_FILE"])
def test_missing_variable_exits_2(tmp_path: Path, missing: str) -> None:
    (tmp_path / "key").write_text(KEY)
    env = {"ENGINE_PORT": str(free_port()), "ENGINE_BRAIN_DIR": str(tmp_path / "b"),
           "ENGINE_API_KEY_FILE": str(tmp_path / "key")}
    del env[missing]
    done = run_to_exit(env)
    assert done.returncode == 2
    assert missing in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("change", [{"ENGINE_PORT": "http"}, {"ENGINE_PORT": "70000"},
                                    {"ENGINE_API_KEY_FILE": "/nonexistent/key"}])
def test_bad_variable_exits_2(tmp_path: Path, change: dict[str, str]) -> None:
    (tmp_path / "key").write_text(KEY)
    env = {"ENGINE_PORT": str(free_port()), "ENGINE_BRAIN_DIR": str(tmp_path / "b"),
           "ENGINE_API_KEY_FILE": str(tmp_path / "key"), **change}
    done = run_to_exit(env)
    assert done.returncode == 2 and next(iter(change)) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY)
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        done = run_to_exit({"ENGINE_PORT": str(taken.getsockname()[1]),
                            "ENGINE_BRAIN_DIR": str(tmp_path / "b"),
                            "ENGINE_API_KEY_FILE": str(tmp_path / "key")})
    assert done.returncode == 1 and "cannot listen" in done.stderr
    assert json.dumps(KEY) not in done.stderr


def test_checkpoint_holds_writes_until_released_or_its_hold_runs_out(
        start: Callable[..., Engine]) -> None:
    engine = start()
    assert engine.call("POST", "/v1/checkpoint", json={"hold_s": 30}).status_code == 200
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(
        engine.call("PUT", "/v1/memory/k", content=b"v").status_code))
    writer.start()
    time.sleep(0.3)
    assert done == []  # held
    assert engine.call("GET", "/v1/memory/k").status_code == 404  # reads go on
    assert engine.call("DELETE", "/v1/checkpoint").json() == {"released": True}
    writer.join(timeout=5)
    assert done == [200]
    assert engine.call("POST", "/v1/checkpoint", json={"hold_s": 0.2}).status_code == 200
    wait_until(lambda: engine.call("PUT", "/v1/memory/k", content=b"w").status_code == 200)
    assert engine.call("DELETE", "/v1/checkpoint").status_code == 409  # it had run out
    for bad in ({"hold_s": 0}, {"hold_s": True}, {"hold_s": "1"}, {"hold_s": 601}):
        assert engine.call("POST", "/v1/checkpoint", json=bad).status_code == 400
    assert engine.call("PUT", "/v1/checkpoint").status_code == 405
