"""Snapshots and restore on the local driver, against a directory store and a real S3 server
on loopback (SeaweedFS), with real engines: what a restore brings back is read from the
engine with its key."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    SYSTEM_PYTHON,
    Orchestrator,
    passable_tmp,
    reachable_refengine,
    running,
    wait_for,
)
from tests.s3server import BUCKET

USER = "ada"


@pytest.fixture(params=["file", "s3"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    env = {"ORCH_SNAPSHOT_INTERVAL_S": "0"}
    if request.param == "s3":
        env.update(request.getfixturevalue("s3"), ORCH_SNAPSHOT_STORE=f"s3://{BUCKET}/{tmp_path.name}")
    with running(tmp_path, env=env) as orchestrator:
        yield orchestrator


@pytest.fixture
def file_orch(tmp_path: Path) -> Iterator[Orchestrator]:
    # A short lease: an operation the killed orchestrator held is taken over sooner.
    env = {"ORCH_SNAPSHOT_INTERVAL_S": "0", "ORCH_SNAPSHOT_KEEP": "2", "ORCH_LEASE_S": "2"}
    with running(tmp_path, env=env) as o:
        yield o


def memory(url: str, key: str, method: str, name: str, value: bytes | None = None) -> httpx.Response:
    return httpx.request(method, f"{url}/v1/memory/{name}", content=value, trust_env=False,
                         timeout=5, headers={"Authorization": f"Bearer {key}"})


def provision(api: httpx.Client) -> tuple[str, str]:
    answer = api.post("/engines/provision", json={"user_id": USER})
    assert answer.status_code == 200, answer.text
    return answer.json()["url"], answer.json()["api_key"]


def test_restore_brings_back_exactly_the_snapshots_files(orch: Orchestrator) -> None:
    api = orch.client("acme")
    url, key = provision(api)
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    assert memory(url, key, "PUT", "size", b"1").is_success
    taken = api.post(f"/engines/{USER}/snapshots")
    assert taken.status_code == 201, taken.text
    snap = taken.json()
    assert snap["files"] == 2 and snap["size_bytes"] == 5 and snap["consistent"] is True
    assert memory(url, key, "PUT", "colour", b"red").is_success
    assert memory(url, key, "DELETE", "size").is_success
    assert memory(url, key, "PUT", "new", b"x").is_success

    restored = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})
    assert restored.status_code == 200, restored.text
    assert restored.json()["status"] == "running"
    url = restored.json()["url"]
    assert memory(url, key, "GET", "colour").content == b"blue"  # the same key works
    assert memory(url, key, "GET", "size").content == b"1"
    assert memory(url, key, "GET", "new").status_code == 404
    events = api.get(f"/engines/{USER}/events").json()["events"]
    restored_event = next(e for e in events if e["event"] == "restored")
    assert restored_event["reason"].startswith(f"{snap['id']} data_age_s=")
    page = api.get(f"/engines/{USER}/snapshots").json()
    assert [s["id"] for s in page["snapshots"]] == [snap["id"]] and page["next_cursor"] is None


def test_bad_unknown_and_foreign_snapshot_ids_change_nothing(file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    provision(api)
    snap = api.post(f"/engines/{USER}/snapshots").json()
    before = api.get(f"/engines/{USER}").json()
    for body, status, code in (
            ({"snapshot_id": "../../etc"}, 400, "INVALID_REQUEST"),
            ({"snapshot_id": "s-20000101000000000-00000000"}, 404, "SNAPSHOT_NOT_FOUND"),
            ({}, 400, "INVALID_REQUEST")):
        answer = api.post(f"/engines/{USER}/restore", json=body)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    assert api.get(f"/engines/{USER}/snapshots", params={"cursor": "bm9wZQ"}).status_code == 400
    file_orch.product("other")
    other = file_orch.client("other")
    for answer in (other.get(f"/engines/{USER}/snapshots"), other.post(f"/engines/{USER}/snapshots"),
                   other.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})):
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "ENGINE_NOT_FOUND"
    assert api.get(f"/engines/{USER}").json() == before  # nothing moved, not even updated_at


def test_retention_keeps_the_newest_and_collects_only_unreferenced_blobs(
        file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    url, key = provision(api)
    ids = []
    for n in range(3):
        assert memory(url, key, "PUT", "kept", b"same in all").is_success
        assert memory(url, key, "PUT", "counter", str(n).encode()).is_success
        ids.append(api.post(f"/engines/{USER}/snapshots").json()["id"])
    listed = api.get(f"/engines/{USER}/snapshots").json()["snapshots"]
    assert [s["id"] for s in listed] == ids[:0:-1]  # the newest two, newest first
    page = api.get(f"/engines/{USER}/snapshots", params={"limit": 1}).json()
    assert [s["id"] for s in page["snapshots"]] == [ids[2]] and page["next_cursor"]
    page = api.get(f"/engines/{USER}/snapshots", params={"limit": 1, "cursor": page["next_cursor"]})
    assert [s["id"] for s in page.json()["snapshots"]] == [ids[1]]
    assert page.json()["next_cursor"] is None
    engine_dir = next((file_orch.state_dir / "snapshots" / "engines").iterdir())
    # A blob that a snapshot cut short left behind: no manifest names it.
    (engine_dir / "blobs" / ("0" * 64)).write_bytes(b"orphan")
    ids.append(api.post(f"/engines/{USER}/snapshots").json()["id"])
    manifests = [json.loads(p.read_text()) for p in (engine_dir / "manifests").iterdir()]
    assert sorted(m["id"] for m in manifests) == ids[2:]
    referenced = {f[3] for m in manifests for f in m["files"]}
    store = file_orch.state_dir / "snapshots"
    assert {oct(p.stat().st_mode & 0o777) for p in [store, *store.rglob("*")] if p.is_dir()} == {"0o700"}
    assert {oct(p.stat().st_mode & 0o777) for p in store.rglob("*") if p.is_file()} == {"0o600"}
    assert {p.name for p in (engine_dir / "blobs").iterdir()} == referenced
    assert api.delete(f"/engines/{USER}").status_code == 200
    assert not engine_dir.exists()  # destroy removes the user's data, copies included


def test_a_snapshot_taken_while_the_engine_writes_restores_whole_values(
        file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    url, key = provision(api)
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        with httpx.Client(trust_env=False, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as engine:
            n = 0
            while not stop.is_set():
                value = str(n).encode() * 1000  # one value, all of one number
                assert engine.put(f"{url}/v1/memory/k{n % 20}", content=value).is_success
                written.append(n)
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # Writes under way first: on a loaded machine the thread can start late.
        wait_for(lambda: len(written) >= 3, timeout=30, what="the writer to be writing")
        snaps = [api.post(f"/engines/{USER}/snapshots") for _ in range(3)]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert all(s.status_code == 201 and s.json()["consistent"] for s in snaps), snaps[-1].text
    restored = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snaps[-1].json()["id"]})
    assert restored.status_code == 200, restored.text
    url = restored.json()["url"]
    for slot in range(20):
        value = memory(url, key, "GET", f"k{slot}")
        if value.status_code == 404:
            continue
        number = value.content[:len(value.content) // 1000]
        assert value.content == number * 1000


def test_scheduled_snapshots_skip_unchanged_brains(tmp_path: Path) -> None:
    with running(tmp_path, env={"ORCH_SNAPSHOT_INTERVAL_S": "0.5"}) as orch:
        api = orch.client("acme")
        url, key = provision(api)
        assert memory(url, key, "PUT", "colour", b"blue").is_success

        def listed() -> list[str]:
            return [s["id"] for s in api.get(f"/engines/{USER}/snapshots").json()["snapshots"]]

        first = wait_for(listed, timeout=15, what="a scheduled snapshot")
        time.sleep(2.0)  # four intervals with nothing written
        assert listed() == first
        assert memory(url, key, "PUT", "colour", b"red").is_success
        wait_for(lambda: len(listed()) == 2, timeout=15, what="a snapshot of the change")


def test_the_cli_snapshots_lists_and_restores(file_orch: Orchestrator) -> None:
    url, key = provision(file_orch.client("acme"))
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    snap = json.loads(file_orch.cli("engines", "snapshot", "acme", USER).stdout)
    listed = json.loads(file_orch.cli("engines", "snapshots", "acme", USER).stdout)
    assert [s["id"] for s in listed] == [snap["id"]]
    assert memory(url, key, "PUT", "colour", b"red").is_success
    engine = json.loads(file_orch.cli("engines", "restore", "acme", USER, snap["id"]).stdout)
    assert engine["status"] == "running"
    assert memory(engine["url"], key, "GET", "colour").content == b"blue"
    assert file_orch.cli("engines", "restore", "acme", USER, "nope", check=False).returncode == 2
    missing = file_orch.cli("engines", "restore", "acme", USER, "s-20000101000000000-00000000",
                            check=False)
    assert missing.returncode == 4 and "SNAPSHOT_NOT_FOUND" in missing.stderr


def big_brain(orch: Orchestrator, files: int = 100, size: int = 128 * 1024) -> Path:
    """Fill the engine's brain directly (the engine runs as the test's user here): a copy of
    it takes long enough to be killed half-way."""
    brain = next((orch.state_dir / "brains").iterdir())
    for n in range(files):
        (brain / f"bulk-{n:04d}").write_bytes(os.urandom(size))
    return brain


def test_sigkill_mid_snapshot_lists_nothing_and_the_next_collects_its_blobs(
        file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    provision(api)
    big_brain(file_orch)
    store = file_orch.state_dir / "snapshots" / "engines"
    threading.Thread(target=lambda: _quietly(api.post, f"/engines/{USER}/snapshots"),
                     daemon=True).start()
    wait_for(lambda: any(store.glob("*/blobs/*")), timeout=30, interval=0.005,
             what="the snapshot's first blobs")
    file_orch.kill()
    assert not any(store.glob("*/manifests/*.json"))
    file_orch.start()
    api = file_orch.client("acme")
    assert api.get(f"/engines/{USER}/snapshots").json()["snapshots"] == []
    snap = api.post(f"/engines/{USER}/snapshots")
    assert snap.status_code == 201, snap.text
    manifest = json.loads(next(store.glob("*/manifests/*.json")).read_text())
    assert {p.name for p in store.glob("*/blobs/*")} == {f[3] for f in manifest["files"]}


def test_sigkill_mid_restore_leaves_the_old_brain_or_the_new_one(file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    provision(api)
    brain = big_brain(file_orch)
    snap = api.post(f"/engines/{USER}/snapshots").json()
    snapshot_files = {p.name: p.read_bytes() for p in brain.iterdir()}
    (brain / "written-after").write_bytes(b"later")
    old_files = {p.name: p.read_bytes() for p in brain.iterdir()}
    threading.Thread(target=lambda: _quietly(api.post, f"/engines/{USER}/restore",
                                             json={"snapshot_id": snap["id"]}), daemon=True).start()
    staging = brain.parent / f".restore-{brain.name}"
    wait_for(lambda: staging.exists() and any(staging.iterdir()), timeout=30, interval=0.005,
             what="the restore's staging")
    file_orch.kill()
    files = {p.name: p.read_bytes() for p in brain.iterdir()}
    assert files in (old_files, snapshot_files)
    file_orch.start()
    api = file_orch.client("acme")
    again = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})
    assert again.status_code == 200 and again.json()["status"] == "running", again.text
    assert {p.name: p.read_bytes() for p in brain.iterdir()} == snapshot_files
    assert not staging.exists()


def _quietly(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except httpx.HTTPError:
        pass  # the orchestrator was killed under it


def tar_of(files: dict[str, bytes], link: str | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return out.getvalue()


def test_a_brain_moves_to_another_product_as_a_tar_archive(file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    url, key = provision(api)
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    assert api.get(f"/engines/{USER}/brain").json()["error"]["code"] == "SNAPSHOT_NOT_FOUND"
    snap = api.post(f"/engines/{USER}/snapshots").json()
    exported = api.get(f"/engines/{USER}/brain")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        assert [m.size for m in tar.getmembers()] == [4]
    assert api.get(f"/engines/{USER}/brain", params={"snapshot_id": snap["id"]}).content == \
        exported.content

    file_orch.product("other")
    other = file_orch.client("other")
    assert other.get(f"/engines/{USER}/brain").status_code == 404  # not the other product's
    _, other_key = provision(other)
    imported = other.post(f"/engines/{USER}/brain", content=exported.content,
                          headers={"Content-Type": "application/x-tar"})
    assert imported.status_code == 201, imported.text
    assert imported.json()["files"] == 1
    engine = other.post(f"/engines/{USER}/restore", json={"snapshot_id": imported.json()["id"]})
    assert memory(engine.json()["url"], other_key, "GET", "colour").content == b"blue"


HOSTILE = {
    "garbage": b"not a tar archive at all" * 40,
    "truncated": tar_of({"a": b"x" * 2000})[:1500],  # cut short inside a file
    "dotdot": tar_of({"../escape": b"x"}),
    "absolute": tar_of({"/etc/passwd": b"x"}),
    "twice": tar_of({"a": b"x", "./a": b"y"}),
    "symlink": tar_of({"a": b"x"}, link="l"),
}


def test_corrupt_or_hostile_archives_are_400_and_list_nothing(file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    provision(api)
    for name, archive in HOSTILE.items():
        answer = api.post(f"/engines/{USER}/brain", content=archive)
        assert answer.status_code == 400, (name, answer.text)
        assert answer.json()["error"]["code"] == "INVALID_REQUEST", name
    assert api.get(f"/engines/{USER}/snapshots").json()["snapshots"] == []


def test_a_store_that_refuses_us_is_502_and_changes_nothing(
        tmp_path: Path, s3: dict[str, str]) -> None:
    env = {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret", "ORCH_SNAPSHOT_INTERVAL_S": "0",
           "ORCH_SNAPSHOT_STORE": f"s3://{BUCKET}/refused"}
    with running(tmp_path, env=env) as orch:
        api = orch.client("acme")
        url, key = provision(api)
        before = api.get(f"/engines/{USER}").json()
        for answer in (api.post(f"/engines/{USER}/snapshots"), api.get(f"/engines/{USER}/snapshots"),
                       api.post(f"/engines/{USER}/restore",
                                json={"snapshot_id": "s-20000101000000000-00000000"})):
            assert answer.status_code == 502, answer.text
            assert answer.json()["error"]["code"] == "SNAPSHOT_STORE_FAILED"
        assert api.get(f"/engines/{USER}").json() == before
        assert memory(url, key, "PUT", "still", b"writable").is_success  # no checkpoint left held


@pytest.mark.skipif(os.geteuid() != 0, reason="engines run as nobody only under a root orchestrator")
def test_a_restored_brain_is_the_nobody_engines_own() -> None:
    """Run as root, engines run as nobody: the files a restore writes (as root) are handed to
    the engine, which reads them back."""
    with passable_tmp("orch-snap-nobody-") as base:
        env = {"ORCH_ENGINE_USER": "", "ORCH_SNAPSHOT_INTERVAL_S": "0",
               "ORCH_ENGINE_CMD": f"{SYSTEM_PYTHON} {reachable_refengine(base)}"}
        with running(base, env=env) as orch:
            api = orch.client("acme")
            url, key = provision(api)
            assert memory(url, key, "PUT", "colour", b"blue").is_success
            snap = api.post(f"/engines/{USER}/snapshots").json()
            assert memory(url, key, "PUT", "colour", b"red").is_success
            engine = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})
            assert engine.status_code == 200, engine.text
            url = engine.json()["url"]
            assert memory(url, key, "GET", "colour").content == b"blue"
            assert memory(url, key, "PUT", "colour", b"green").is_success  # and writes it


def test_provision_from_a_snapshot_starts_with_its_brain(file_orch: Orchestrator) -> None:
    api = file_orch.client("acme")
    url, key = provision(api)
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    snap = api.post(f"/engines/{USER}/snapshots").json()
    for source, status, code in (({"user_id": "nobody-here", "snapshot_id": snap["id"]}, 404,
                                  "ENGINE_NOT_FOUND"),
                                 ({"user_id": USER, "snapshot_id": "s-20000101000000000-00000000"},
                                  404, "SNAPSHOT_NOT_FOUND"),
                                 ({"user_id": USER, "snapshot_id": "bad"}, 400, "INVALID_REQUEST")):
        answer = api.post("/engines/provision", json={"user_id": "twin", "from_snapshot": source})
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    assert api.get("/engines/twin").status_code == 404  # nothing was created
    twin = api.post("/engines/provision", json={"user_id": "twin", "from_snapshot": {
        "user_id": USER, "snapshot_id": snap["id"]}})
    assert twin.status_code == 200, twin.text
    assert memory(twin.json()["url"], twin.json()["api_key"], "GET", "colour").content == b"blue"
    assert memory(url, key, "PUT", "colour", b"red").is_success  # two brains, not one
    assert memory(twin.json()["url"], twin.json()["api_key"], "GET", "colour").content == b"blue"
