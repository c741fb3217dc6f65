"""The snapshot sidecar (`python -m app.snapshots.sidecar`) as Nomad runs it: a real process,
real HTTP on loopback, a directory store and a real S3 server, a config file rewritten under it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.snapshots import tree
from app.snapshots.service import Snapshots
from app.snapshots.store import open_store
from tests.harness import ROOT, free_port, wait_for
from tests.s3server import BUCKET

PREFIX = "engines/ada/"
FILES, SIZE = 100, 10 * 1024


class Sidecar:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, config: Path):
        self.proc, self.url, self.config = proc, url, config

    def call(self, method: str, path: str, token: str | None = "t0") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, trust_env=False)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Whole, by a rename, as Nomad's template renders it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


def sidecar_env(mode: str, brain: Path, config: Path, **extra: str) -> dict[str, str]:
    # Nothing of ours but the sidecar's variables: no AWS_* reaches it but through its config.
    return {"PATH": os.environ["PATH"], "ORCH_SIDECAR_MODE": mode, "ORCH_SIDECAR_BRAIN": str(brain),
            "ORCH_SIDECAR_CONFIG": str(config), **extra}


@contextmanager
def serving(tmp: Path, config: dict[str, Any], brain: Path) -> Iterator[Sidecar]:
    """The serve process, its imports listed in sidecar.log (-X importtime is not passed on
    to the children it starts)."""
    path, port = tmp / "snapshot.json", free_port()
    write_config(path, config)
    env = sidecar_env("serve", brain, path, ORCH_SIDECAR_HOST="127.0.0.1", ORCH_SIDECAR_PORT=str(port))
    log = open(tmp / "sidecar.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "app.snapshots.sidecar"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    side = Sidecar(proc, f"http://127.0.0.1:{port}", path)
    try:
        wait_for(lambda: _healthy(side), timeout=20, what="the sidecar's /health")
        yield side
        if proc.returncode is None:  # not stopped by the test itself
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, (tmp / "sidecar.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _healthy(side: Sidecar) -> bool:
    assert side.proc.poll() is None, "the sidecar exited"
    try:
        answer = side.call("GET", "/health", token=None)
    except httpx.TransportError:
        return False
    assert answer.json() == {"status": "ok"}
    return True


def imported(log: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in log.splitlines() if line.startswith("import time:")}


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, each with its start time (a pid can be reused)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat_line = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue  # ended while we looked
        fields = stat_line.rsplit(")", 1)[-1].split()
        if fields and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def state(pid: int, started: str) -> str | None:
    """The process's state (R, S, Z...), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0] if fields[19] == started else None


def make_brain(brain: Path) -> None:
    (brain / "sub" / "deeper").mkdir(parents=True)
    (brain / "empty").mkdir()
    for i in range(FILES):
        (brain / ("sub" if i % 2 else ".") / f"f{i:03d}").write_bytes(os.urandom(SIZE))
    (brain / "sub" / "deeper" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (brain / "sub" / "deeper" / "run.sh").chmod(0o755)
    (brain / "f000").chmod(0o640)


def files_of(brain: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file (its bytes and mode) and directory (None) under `brain`."""
    found: dict[str, tuple[bytes, int] | None] = {}
    for path in sorted(brain.rglob("*")):
        rel = str(path.relative_to(brain))
        found[rel] = None if path.is_dir() else (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return found


@pytest.fixture(params=["file", "s3"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "file":
        return {"store": (tmp_path / "store").as_uri(), "prefix": PREFIX, "token": "t0"}
    s3 = request.getfixturevalue("s3")
    return {"store": f"s3://{BUCKET}/{tmp_path.name}", "aws": s3, "prefix": PREFIX, "token": "t0"}


def test_a_second_snapshot_sends_only_the_changed_bytes(
        tmp_path: Path, store_config: dict[str, Any]) -> None:
    brain = tmp_path / "brain"
    make_brain(brain)
    with serving(tmp_path, store_config, brain) as side:
        at_rest = side.rss_kib()
        mark = side.call("GET", "/v1/fingerprint")
        assert mark.status_code == 200 and mark.headers["content-type"] == "application/json"
        assert mark.json() == {"fingerprint": tree.fingerprint(brain)}
        answer = side.call("POST", "/v1/snapshot")
        assert answer.status_code == 200, answer.text
        first = answer.json()
        total = FILES * SIZE + len(b"#!/bin/sh\n")
        assert (first["size_bytes"], first["new_bytes"], len(first["files"])) == (total, total, FILES + 1)
        assert sorted(first["dirs"]) == ["empty", "sub", "sub/deeper"]
        assert first["fingerprint"] == mark.json()["fingerprint"]
        after_one = side.rss_kib()

        (brain / "sub" / "f051").write_bytes(os.urandom(SIZE))  # 1% of the brain
        changed = side.call("GET", "/v1/fingerprint").json()["fingerprint"]
        assert changed != first["fingerprint"] and changed == tree.fingerprint(brain)
        second = side.call("POST", "/v1/snapshot").json()
        assert (second["size_bytes"], second["new_bytes"]) == (total, SIZE)
        assert second["fingerprint"] == changed
        after_two = side.rss_kib()
    store = open_store(store_config["store"], store_config.get("aws"))
    assert len(list(store.keys(f"{PREFIX}blobs/"))) == FILES + 2
    serve_imports = imported((tmp_path / "sidecar.log").read_text())
    assert "app.snapshots.tree" in serve_imports
    assert not serve_imports & {"boto3", "botocore"}  # the snapshots' children imported them
    print(f"\nsidecar VmRSS ({store_config['store'].split(':')[0]}): at rest {at_rest} KiB, "
          f"after one snapshot {after_one} KiB, after two {after_two} KiB")


def test_only_the_configured_token_is_let_in_and_a_rewritten_config_applies(tmp_path: Path) -> None:
    config = {"store": (tmp_path / "store").as_uri(), "prefix": PREFIX, "token": "t0"}
    (tmp_path / "brain").mkdir()
    with serving(tmp_path, config, tmp_path / "brain") as side:
        for token in (None, "wrong", "t00"):
            for method, path in (("GET", "/v1/fingerprint"), ("POST", "/v1/snapshot")):
                answer = side.call(method, path, token=token)
                assert answer.status_code == 401, answer.text
                assert answer.json()["error"]["code"] == "UNAUTHORIZED"
        assert side.call("GET", "/v1/fingerprint").status_code == 200
        assert side.call("GET", "/v1/nothing").status_code == 404
        assert side.call("DELETE", "/v1/snapshot").json()["error"]["code"] == "METHOD_NOT_ALLOWED"
        assert not (tmp_path / "store").exists()  # refused calls wrote nothing

        write_config(side.config, {**config, "token": "t1"})
        assert side.call("GET", "/v1/fingerprint", token="t0").status_code == 401
        assert side.call("GET", "/v1/fingerprint", token="t1").status_code == 200


@contextmanager
def stuck_store(tmp: Path) -> Iterator[tuple[socket.socket, dict[str, Any]]]:
    """A one-file brain at tmp/brain, and a sidecar config whose S3 store is a socket that
    accepts and never answers: a copy into it is held in its store call."""
    (tmp / "brain").mkdir()
    (tmp / "brain" / "f").write_bytes(b"x")
    with socket.create_server(("127.0.0.1", 0)) as stuck:
        stuck.settimeout(20)
        aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{stuck.getsockname()[1]}",
               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
        yield stuck, {"store": f"s3://{BUCKET}/x", "aws": aws, "prefix": PREFIX, "token": "t0"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_second_snapshot_while_one_runs_is_busy_and_the_sidecars_end_ends_its_child(
        tmp_path: Path, sig: signal.Signals) -> None:
    """The first snapshot's store is a socket that accepts and never answers: its child process
    is held inside the store call until the sidecar ends. SIGTERM: the sidecar kills and reaps
    it, then exits 0; SIGKILL: the kernel kills it (its parent-death signal)."""
    with stuck_store(tmp_path) as (stuck, config), \
            serving(tmp_path, config, tmp_path / "brain") as side:
        first: list[Any] = []
        caller = threading.Thread(target=lambda: first.append(_quietly(side, "/v1/snapshot")))
        caller.start()
        held, _ = stuck.accept()  # the first snapshot is in its store call, holding the lock
        with held:
            [(child, started)] = children(side.proc.pid).items()
            second = side.call("POST", "/v1/snapshot")
            assert second.status_code == 409 and second.json()["error"]["code"] == "BUSY"
            assert side.call("GET", "/v1/fingerprint").status_code == 200  # not held up
            side.proc.send_signal(sig)
            assert side.proc.wait(timeout=10) == (0 if sig == signal.SIGTERM else -sig)
            if sig == signal.SIGTERM:
                assert state(child, started) is None  # killed and reaped before the exit
            else:  # an orphan now: gone, or a zombie until whatever adopted it reaps it
                wait_for(lambda: state(child, started) in (None, "Z"), timeout=10,
                         what="the snapshot's child to end with its parent")
        caller.join(timeout=30)
        assert not caller.is_alive() and first == [None]  # cut off by the exit


def test_a_copy_longer_than_its_timeout_is_stopped_and_answered_502(tmp_path: Path) -> None:
    """The store accepts and never answers; past `copy_timeout_s` the child is killed and
    reaped, the caller hears why, and the brain is free for the next snapshot (not BUSY)."""
    with stuck_store(tmp_path) as (_, stuck_config):
        config = {**stuck_config, "copy_timeout_s": 1}
        with serving(tmp_path, config, tmp_path / "brain") as side:
            for _ in range(2):
                answer = side.call("POST", "/v1/snapshot")
                assert answer.status_code == 502, answer.text
                error = answer.json()["error"]
                assert error["code"] == "SNAPSHOT_STORE_FAILED"
                assert "took longer than 1 s" in error["message"], error
                assert children(side.proc.pid) == {}   # killed and reaped
            write_config(side.config, {**config, "copy_timeout_s": "soon"})
            answer = side.call("POST", "/v1/snapshot")
            assert answer.status_code == 502 and "copy_timeout_s" in answer.text


def _quietly(side: Sidecar, path: str) -> httpx.Response | None:
    try:
        return side.call("POST", path)
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("refusal", ["directory", "s3"])
def test_a_store_that_refuses_is_502_saying_why(
        request: pytest.FixtureRequest, tmp_path: Path, refusal: str) -> None:
    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "f").write_bytes(b"x")
    if refusal == "directory":
        (tmp_path / "a-file").write_bytes(b"")
        config: dict[str, Any] = {"store": (tmp_path / "a-file" / "store").as_uri()}
        why = "Not a directory"
    else:
        s3 = request.getfixturevalue("s3")
        config = {"store": f"s3://{BUCKET}/{tmp_path.name}",
                  "aws": {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}}
        why = "SignatureDoesNotMatch"
    with serving(tmp_path, {**config, "prefix": PREFIX, "token": "t0"}, tmp_path / "brain") as side:
        answer = side.call("POST", "/v1/snapshot")
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "SNAPSHOT_STORE_FAILED" and why in error["message"], error
        assert side.call("GET", "/health", token=None).status_code == 200


def committed_snapshot(tmp_path: Path, store_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A brain taken and committed the way the orchestrator does; its manifest and id."""
    brain = tmp_path / "original"
    make_brain(brain)
    snapshots = Snapshots(Settings(), open_store(store_config["store"], store_config.get("aws")))

    async def take() -> dict[str, Any]:
        manifest = await snapshots.take("ada", brain, engine_version="1", consistent=True)
        await snapshots.commit("ada", manifest)
        return manifest

    manifest = asyncio.run(take())
    return manifest, manifest["id"]


def restore(tmp_path: Path, config: dict[str, Any], brain: Path, python: tuple[str, ...] = (
        sys.executable,), cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "restore.json"
    write_config(path, config)
    return subprocess.run([*python, "-m", "app.snapshots.sidecar"], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=sidecar_env("restore", brain, path))


def test_restore_writes_exactly_the_snapshots_files_even_over_a_cut_short_attempt(
        tmp_path: Path, store_config: dict[str, Any]) -> None:
    _, snapshot = committed_snapshot(tmp_path, store_config)
    config = {**store_config, "source_prefix": PREFIX, "snapshot": snapshot}
    volume = tmp_path / "volume"
    volume.mkdir()
    done = restore(tmp_path, config, volume)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == FILES + 1
    assert files_of(volume) == files_of(tmp_path / "original")

    (volume / "sub" / "f001").write_bytes(b"half")  # what a kill mid-write leaves
    (volume / "junk" / "deep").mkdir(parents=True)
    (volume / "junk" / "deep" / "x").write_bytes(b"x")
    (volume / "f000").unlink()
    os.symlink("/etc", volume / "link")
    again = restore(tmp_path, config, volume)
    assert again.returncode == 0, again.stderr
    assert files_of(volume) == files_of(tmp_path / "original")


def test_a_missing_snapshot_or_a_damaged_blob_is_exit_1_with_one_line(tmp_path: Path) -> None:
    store_config = {"store": (tmp_path / "store").as_uri()}
    manifest, snapshot = committed_snapshot(tmp_path, store_config)
    volume = tmp_path / "volume"
    missing = restore(tmp_path, {**store_config, "source_prefix": PREFIX,
                                 "snapshot": "s-20000101000000000-00000000"}, volume)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert "s-20000101000000000-00000000 is not in" in missing.stderr

    victim = tmp_path / "store" / tree.blob_key(PREFIX, manifest["files"][7][3])
    victim.write_bytes(b"not what was stored")
    damaged = restore(tmp_path, {**store_config, "source_prefix": PREFIX, "snapshot": snapshot}, volume)
    assert damaged.returncode == 1 and damaged.stderr.count("\n") == 1, damaged.stderr
    assert "is damaged" in damaged.stderr


def test_the_sidecar_runs_with_only_its_modules_and_the_standard_library(tmp_path: Path) -> None:
    """Its image holds app/errors.py and app/snapshots/{store,tree,sidecar,sidecar_http}.py, no site-packages:
    an import of the server (peewee, starlette, httpx, app.config) fails here."""
    image = tmp_path / "image"
    for rel in ("app/__init__.py", "app/errors.py", "app/snapshots/__init__.py",
                "app/snapshots/store.py", "app/snapshots/tree.py", "app/snapshots/sidecar.py",
                "app/snapshots/sidecar_http.py"):
        (image / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, image / rel)
    store_config = {"store": (tmp_path / "store").as_uri()}
    _, snapshot = committed_snapshot(tmp_path, store_config)
    (tmp_path / "volume").mkdir()
    done = restore(tmp_path, {**store_config, "source_prefix": PREFIX, "snapshot": snapshot},
                   tmp_path / "volume", python=(sys.executable, "-S", "-X", "importtime"), cwd=image)
    assert done.returncode == 0, done.stderr
    modules = imported(done.stderr)
    assert {"app.snapshots.tree", "app.snapshots.store"} <= modules
    assert not modules & {"peewee", "starlette", "httpx", "uvicorn", "app.config", "boto3"}
