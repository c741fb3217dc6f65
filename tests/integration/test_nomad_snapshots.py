"""Snapshots and restore on Nomad, against the 3-node double with dev timing: the sidecar in
the engine's task group copies the brain where it lives (into a real S3 server on loopback, or
a directory), and a restore fills a new volume through a prestart task before the engine
starts. What a restore brings back is read from the engine with its key."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.drivers import _nomad_sidecar, _nomad_snapshots
from app.drivers.base import LEFTOVERS, EngineSpec
from app.drivers.nomad import NomadDriver
from app.errors import EngineCrashed
from app.snapshots.service import Snapshots, build_manifest
from app.snapshots.store import open_store
from tests.doubles.fixture import served
from tests.harness import ROOT, Orchestrator, free_port_range, wait_for
from tests.s3server import BUCKET, SECRET_KEY
from tests.scheduler import get, leftovers, needs_double
from tests.unit.test_nomad_driver_rows import readme_policy

pytestmark = pytest.mark.timeout(180)
USER = "ada"


@contextmanager
def closing(orch: Orchestrator) -> Iterator[Orchestrator]:
    try:
        yield orch
        assert orch.stack.rejections() == []
    finally:
        orch.close()


def orchestrator(tmp: Path, **env: str) -> Orchestrator:
    orch = Orchestrator(tmp, driver="nomad", env={"ORCH_SNAPSHOT_INTERVAL_S": "0", **env})
    try:
        orch.start()
        orch.product("acme")
    except BaseException:
        orch.close()
        raise
    return orch


@pytest.fixture
def s3_orch(tmp_path: Path, s3: dict[str, str]) -> Iterator[Orchestrator]:
    orch = orchestrator(tmp_path, **s3, ORCH_SNAPSHOT_STORE=f"s3://{BUCKET}/{tmp_path.name}")
    try:
        yield orch
        assert orch.stack.rejections() == []
    finally:
        orch.close()


def memory(url: str, key: str, method: str, name: str, value: bytes | None = None) -> httpx.Response:
    return httpx.request(method, f"{url}/v1/memory/{name}", content=value, trust_env=False,
                         timeout=5, headers={"Authorization": f"Bearer {key}"})


def provision(api: httpx.Client, user: str = USER) -> tuple[str, str]:
    answer = api.post("/engines/provision", json={"user_id": user})
    assert answer.status_code == 200, answer.text
    return answer.json()["url"], answer.json()["api_key"]


def volumes(orch: Orchestrator) -> list[str]:
    return sorted(leftovers(orch.env["NOMAD_ADDR"])["volumes"])


def driver_state(orch: Orchestrator) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(orch.engine_row(USER)["driver_state"])
    return state


def blue_snapshot_then_red(orch: Orchestrator,
                           api: httpx.Client) -> tuple[str, str, str, dict[str, Any]]:
    """A new engine whose snapshot says `blue` and whose brain says `red` since:
    (url, key, engine name, the snapshot)."""
    url, key = provision(api)
    name = orch.rows("SELECT name FROM engine")[0][0]
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    snap = api.post(f"/engines/{USER}/snapshots").json()
    assert memory(url, key, "PUT", "colour", b"red").is_success
    return url, key, name, snap


def moved_from(orch: Orchestrator, node: str, statuses: tuple[str, ...] = ("running",)) -> bool:
    """The engine is back in one of `statuses` on another node than `node`."""
    row = orch.engine_row(USER)
    return row["status"] in statuses and json.loads(row["driver_state"])["node"] != node


def s3_objects(env: dict[str, str], prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents") or []
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_the_sidecar_copies_the_brain_and_a_restore_fills_a_new_volume(
        s3_orch: Orchestrator, s3: dict[str, str], tmp_path: Path) -> None:
    orch = s3_orch
    api = orch.client("acme")
    url, key = provision(api)
    name = orch.rows("SELECT name FROM engine")[0][0]
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    assert memory(url, key, "PUT", "size", b"1").is_success
    first = api.post(f"/engines/{USER}/snapshots")
    assert first.status_code == 201, first.text
    snap = first.json()
    assert (snap["files"], snap["size_bytes"], snap["consistent"]) == (2, 5, True)
    assert memory(url, key, "PUT", "colour", b"red").is_success
    second = api.post(f"/engines/{USER}/snapshots").json()
    stored = s3_objects(s3, f"{tmp_path.name}/engines/{name}/")
    manifest = json.loads(stored[f"{tmp_path.name}/engines/{name}/manifests/{second['id']}.json"])
    assert (len(manifest["files"]), manifest["new_bytes"]) == (2, 3)  # only `red` is new
    assert len([k for k in stored if "/blobs/" in k]) == 3
    # The store's credentials reach the sidecar through its variable, never through the job.
    job = get(orch.env["NOMAD_ADDR"], f"/v1/job/{name}")
    assert SECRET_KEY not in json.dumps(job)

    assert memory(url, key, "DELETE", "size").is_success
    assert memory(url, key, "PUT", "new", b"x").is_success
    restored = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})
    assert restored.status_code == 200, restored.text
    url = restored.json()["url"]
    assert memory(url, key, "GET", "colour").content == b"blue"  # the same key works
    assert memory(url, key, "GET", "size").content == b"1"
    assert memory(url, key, "GET", "new").status_code == 404
    assert volumes(orch) == [f"{name}-r1"]  # a new volume; the old one is deleted
    job = get(orch.env["NOMAD_ADDR"], f"/v1/job/{name}")
    assert job["TaskGroups"][0]["Volumes"]["brain"]["Source"] == f"{name}-r1"
    events = api.get(f"/engines/{USER}/events").json()["events"]
    reason = next(e for e in events if e["event"] == "restored")["reason"]
    assert reason.startswith(f"{snap['id']} data_age_s=")
    state = driver_state(orch)
    assert _nomad_snapshots.RESTORING not in state and LEFTOVERS not in state

    assert api.delete(f"/engines/{USER}").status_code == 200
    assert leftovers(orch.env["NOMAD_ADDR"]) == {"jobs": [], "volumes": [], "variables": []}
    assert s3_objects(s3, f"{tmp_path.name}/engines/{name}/") == {}


def test_renewed_store_credentials_reach_a_running_engines_sidecar_before_its_copy(
        s3_orch: Orchestrator, s3: dict[str, str]) -> None:
    """The sidecar's variable still holds credentials that no longer work (expired since the
    launch): the next snapshot writes the current ones, with a new token, and copies once the
    sidecar has taken them up."""
    orch, nomad_addr = s3_orch, s3_orch.env["NOMAD_ADDR"]
    api = orch.client("acme")
    url, key = provision(api)
    name = orch.rows("SELECT name FROM engine")[0][0]
    assert memory(url, key, "PUT", "colour", b"blue").is_success
    [path] = [v["Path"] for v in get(nomad_addr, "/v1/vars", prefix=f"nomad/jobs/{name}/")
              if v["Path"].endswith("/snapshot")]
    config = json.loads(get(nomad_addr, f"/v1/var/{path}")["Items"]["config"])
    expired = {**config, "aws": {**config["aws"], "AWS_SECRET_ACCESS_KEY": "expired"},
               "resolved_at": config["resolved_at"] - 3600}   # resolved before the renewal
    put = httpx.put(f"{nomad_addr}/v1/var/{path}", trust_env=False, timeout=10,
                    json={"Path": path, "Items": {"config": json.dumps(expired)}})
    assert put.status_code == 200, put.text
    alloc = get(nomad_addr, f"/v1/allocation/{driver_state(orch)['alloc']}")
    sidecar = _nomad_sidecar.sidecar_url(alloc)
    assert sidecar is not None

    def refused() -> bool:   # the expired credentials are rendered: a copy with them fails
        answer = httpx.post(f"{sidecar}/v1/snapshot", trust_env=False, timeout=30,
                            headers={"Authorization": f"Bearer {config['token']}"})
        return answer.status_code == 502 and "SignatureDoesNotMatch" in answer.text
    wait_for(refused, timeout=20, interval=0.3, what="the sidecar to read the expired credentials")

    taken = api.post(f"/engines/{USER}/snapshots")
    assert taken.status_code == 201, taken.text
    assert taken.json()["files"] == 1
    renewed = json.loads(get(nomad_addr, f"/v1/var/{path}")["Items"]["config"])
    assert renewed["aws"]["AWS_SECRET_ACCESS_KEY"] == s3["AWS_SECRET_ACCESS_KEY"]
    assert renewed["token"] != config["token"]
    old_token = httpx.get(f"{sidecar}/v1/fingerprint", trust_env=False, timeout=10,
                          headers={"Authorization": f"Bearer {config['token']}"})
    assert old_token.status_code == 401


def test_a_failed_restore_keeps_the_old_brain_and_provision_from_a_snapshot_restores(
        tmp_path: Path) -> None:
    # No automatic restarts: the start below is the next one.
    with closing(orchestrator(tmp_path, ORCH_MAX_RESTARTS="0")) as orch:
        _failed_restore(orch)


def _failed_restore(orch: Orchestrator) -> None:
    stack = needs_double(orch)
    api = orch.client("acme")
    _url, key, name, snap = blue_snapshot_then_red(orch, api)
    stack.fault(fail_tasks=["restore"])
    answer = api.post(f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]})
    assert answer.status_code == 504, answer.text
    got = api.get(f"/engines/{USER}").json()
    assert got["status"] == "failed" and got["failure_reason"] == "crashed"
    assert volumes(orch) == [name, f"{name}-r1"]  # the old brain is kept
    old = driver_state(orch)[LEFTOVERS][0]
    kept = Path(get(orch.env["NOMAD_ADDR"], f"/v1/volume/host/{old['volume']}")["HostPath"])
    assert [f.read_bytes() for f in kept.iterdir()] == [b"red"]  # untouched

    stack.fault(fail_tasks=[])
    started = api.post(f"/engines/{USER}/start")
    assert started.status_code == 200, started.text
    assert memory(started.json()["url"], key, "GET", "colour").content == b"blue"
    assert volumes(orch) == [f"{name}-r1"]

    # provision from a snapshot: the restore task fills the new engine's first volume
    seeded = api.post("/engines/provision", json={
        "user_id": "bob", "from_snapshot": {"user_id": USER, "snapshot_id": snap["id"]}})
    assert seeded.status_code == 200, seeded.text
    bob = seeded.json()
    assert memory(bob["url"], bob["api_key"], "GET", "colour").content == b"blue"
    bob_name = orch.rows("SELECT name FROM engine WHERE user_id = 'bob'")[0][0]
    assert bob_name in volumes(orch)


def test_scheduled_snapshots_skip_an_unchanged_brain(tmp_path: Path) -> None:
    with closing(orchestrator(tmp_path, ORCH_SNAPSHOT_INTERVAL_S="1")) as orch:
        api = orch.client("acme")
        url, key = provision(api)

        def taken() -> list[dict[str, Any]]:
            return api.get(f"/engines/{USER}/snapshots").json()["snapshots"]

        wait_for(lambda: len(taken()) == 1, timeout=15, what="the first scheduled snapshot")
        time.sleep(2.5)  # two more intervals: the brain did not change
        assert len(taken()) == 1
        assert memory(url, key, "PUT", "colour", b"blue").is_success
        wait_for(lambda: len(taken()) == 2, timeout=15, what="a snapshot of the changed brain")
        assert taken()[0]["files"] == 1


def test_a_stop_first_copies_a_brain_changed_since_its_latest_snapshot(tmp_path: Path) -> None:
    """A stopped engine's sidecar is stopped too: what changed since the schedule's last copy
    is copied before the stop (a scheduled copy in between would hold it as well), and an
    unchanged brain is not copied again."""
    with closing(orchestrator(tmp_path, ORCH_SNAPSHOT_INTERVAL_S="3600")) as orch:
        api = orch.client("acme")
        url, key = provision(api)
        assert memory(url, key, "PUT", "colour", b"red").is_success
        assert api.post(f"/engines/{USER}/stop").status_code == 200
        [snap] = api.get(f"/engines/{USER}/snapshots").json()["snapshots"]
        assert snap["consistent"] is True   # checkpointed while still running
        with tarfile.open(fileobj=io.BytesIO(api.get(f"/engines/{USER}/brain").content)) as tar:
            [member] = tar.getmembers()
            assert (extracted := tar.extractfile(member)) is not None and extracted.read() == b"red"
        events = [e["event"] for e in api.get(f"/engines/{USER}/events").json()["events"]]
        assert events[:3] == ["stopped", "stop", "snapshot"]   # newest first
        started = api.post(f"/engines/{USER}/start")
        assert started.status_code == 200, started.text
        assert api.post(f"/engines/{USER}/stop").status_code == 200
        assert len(api.get(f"/engines/{USER}/snapshots").json()["snapshots"]) == 1


def test_an_idle_stop_first_copies_a_changed_brain(tmp_path: Path) -> None:
    env = {"ORCH_SNAPSHOT_INTERVAL_S": "3600", "ORCH_IDLE_SLEEP_S": "3", "ORCH_SLEEP_MODE": "stop"}
    with closing(orchestrator(tmp_path, **env)) as orch:
        api = orch.client("acme")
        url, key = provision(api)
        assert memory(url, key, "PUT", "colour", b"red").is_success
        wait_for(lambda: orch.engine_row(USER)["status"] == "sleeping" and
                 not orch.engine_row(USER)["url"], timeout=30, what="the idle stop")
        [snap] = api.get(f"/engines/{USER}/snapshots").json()["snapshots"]
        assert snap["files"] == 1 and snap["consistent"] is True


def test_tidy_deletes_a_stale_volume_once_its_node_is_back(tmp_path: Path) -> None:
    with served(tmp_path / "stack", free_port_range(10), nodes=3, dev=True) as stack:
        settings = Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul,
                            nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json",
                            stop_grace_s=2.0, state_dir=tmp_path / "state")
        spec = EngineSpec("e-acme-tidy-0123456789ab", "acme", "tidy", "0.1.0")

        async def work() -> None:
            driver = NomadDriver(settings)
            snaps = Snapshots(settings, open_store((tmp_path / "state" / "snapshots").as_uri()))
            try:
                state = await driver.create(spec, "k1")
                state, url = await driver.wait_ready(spec, state, 30)
                assert memory(url, "k1", "PUT", "colour", b"blue").is_success
                copied = await driver.copy_brain(spec, state)
                manifest = build_manifest(spec.name, copied, fingerprint=copied["fingerprint"],
                                          engine_version="0.1.0", consistent=False, now=time.time())
                await snaps.commit(spec.name, manifest)
                state = await driver.stop(spec, state, 2.0)
                old_node = state["node"]
                stack.node_lost(old_node)
                state = await driver.restore_brain(spec, state, spec.name, manifest["id"],
                                                   elsewhere=True)
                assert state["node"] != old_node
                state = await driver.launch(spec, state, "k1")
                state, url = await driver.wait_ready(spec, state, 30)
                assert memory(url, "k1", "GET", "colour").content == b"blue"
                assert [e["node"] for e in state[LEFTOVERS]] == [old_node]  # its node is down
                assert await driver.tidy(spec, state) == state
                stack.node_up(old_node)
                tidied = await driver.tidy(spec, state)
                assert LEFTOVERS not in tidied
                names = [v["name"] for v in stack.state()["volumes"]]
                assert names == [f"{spec.name}-r1"]
                # an orphan's generations and variables are found by its name alone
                assert await driver.list_names() == {spec.name}
                await driver.destroy(spec, None)
                assert not stack.state()["volumes"] and not stack.state()["variables"]
            finally:
                await driver.close()

        asyncio.run(work())


def test_with_acls_only_the_sidecar_reads_the_store_credentials(tmp_path: Path) -> None:
    """The orchestrator's documented policy covers snapshots and restores; the sidecar and
    the restore task read their variables by workload identity; the engine task cannot."""
    template = json.loads((ROOT / "jobspecs" / "engine.docker.json").read_text())
    engine = template["TaskGroups"][0]["Tasks"][0]
    stolen = {**engine["Templates"][0], "DestPath": "secrets/stolen.json", "ChangeMode": "noop",
              "EmbeddedTmpl": '{{ with nomadVar "${snapshot_var_path}" }}{{ .config }}{{ end }}'}
    del stolen["ChangeSignal"]
    engine["Templates"].append(stolen)
    greedy = tmp_path / "greedy.json"
    greedy.write_text(json.dumps(template))
    with served(tmp_path / "stack", free_port_range(10), nodes=3, dev=True) as stack:
        def settings(jobspec: Path) -> Settings:
            return Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul,
                            nomad_token="orch", nomad_jobspec=jobspec, stop_grace_s=2.0,
                            state_dir=tmp_path / "state")

        async def work() -> str:
            ours = EngineSpec("e-acme-acl-0123456789ab", "acme", "acl", "0.1.0")
            driver = NomadDriver(settings(ROOT / "jobspecs" / "engine.docker.json"))
            try:
                state = await driver.create(ours, "k1")
                state, url = await driver.wait_ready(ours, state, 30)
                assert memory(url, "k1", "PUT", "colour", b"blue").is_success
                copied = await driver.copy_brain(ours, state)
                assert len(copied["files"]) == 1
                snaps = Snapshots(driver.settings)
                manifest = build_manifest(ours.name, copied, fingerprint=copied["fingerprint"],
                                          engine_version="0.1.0", consistent=False, now=time.time())
                await snaps.commit(ours.name, manifest)
                state = await driver.stop(ours, state, 2.0)
                state = await driver.restore_brain(ours, state, ours.name, manifest["id"])
                state = await driver.launch(ours, state, "k1")
                state, url = await driver.wait_ready(ours, state, 30)
                assert memory(url, "k1", "GET", "colour").content == b"blue"
                await driver.destroy(ours, state)
            finally:
                await driver.close()
            thief = EngineSpec("e-acme-thief-0123456789ab", "acme", "thief", "0.1.0")
            driver = NomadDriver(settings(greedy))
            try:
                state = await driver.create(thief, "k1")
                with pytest.raises(EngineCrashed):
                    await driver.wait_ready(thief, state, 30)
                alloc = await driver._io(driver.api.allocation, state["alloc"])
                await driver.destroy(thief, state)
                return json.dumps(alloc["TaskStates"]["engine"]["Events"])
            finally:
                await driver.close()

        stack.acl({"orch": readme_policy()})
        # a refused read is retried (Nomad: for 5 minutes) before it fails the task
        stack.fault(nomad_retry_s=1.0)
        events = asyncio.run(work())
        assert "403 (Permission denied)" in events and "snapshot" in events
        assert list((stack.data_dir).rglob("stolen.json")) == []


def test_an_engine_whose_node_is_lost_comes_back_elsewhere_from_its_latest_snapshot(
        tmp_path: Path) -> None:
    with closing(orchestrator(tmp_path, ORCH_NODE_LOST_RESTORE_S="1")) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        url, key, name, snap = blue_snapshot_then_red(orch, api)
        lost = driver_state(orch)["node"]
        stack.node_lost(lost)

        wait_for(lambda: moved_from(orch, lost), timeout=60,
                 what="the engine running again on another node")
        url = api.get(f"/engines/{USER}").json()["url"]
        assert memory(url, key, "GET", "colour").content == b"blue"  # the snapshot's; same key
        events = api.get(f"/engines/{USER}/events").json()["events"]
        reason = next(e for e in events if e["event"] == "restored")["reason"]
        assert reason.startswith(f"{snap['id']} data_age_s=") and reason.endswith("node_lost")
        state = driver_state(orch)
        assert [v["node"] for v in state[LEFTOVERS]] == [lost]  # the stale brain waits for its node
        assert volumes(orch) == [name, f"{name}-r1"]

        stack.node_up(lost)  # back: its stale volume is deleted, never mounted again
        wait_for(lambda: volumes(orch) == [f"{name}-r1"], timeout=30, what="the stale volume deleted")
        wait_for(lambda: LEFTOVERS not in driver_state(orch),
                 timeout=30, what="the row without leftovers")
        assert api.get(f"/engines/{USER}").json()["status"] == "running"
        assert memory(url, key, "GET", "colour").content == b"blue"


def test_an_orchestrator_killed_mid_restore_leaves_no_volume_and_the_old_brain(
        tmp_path: Path) -> None:
    with closing(orchestrator(tmp_path, ORCH_LEASE_S="2")) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        _url, key, name, snap = blue_snapshot_then_red(orch, api)
        stack.fault(fingerprint_s=30)   # the new volume stays pending: the kill comes meanwhile
        restoring = threading.Thread(target=lambda: _quietly(
            api.post, f"/engines/{USER}/restore", json={"snapshot_id": snap["id"]}))
        restoring.start()
        wait_for(lambda: len(volumes(orch)) == 2, timeout=30, what="the restore's new volume")
        orch.kill()
        restoring.join(timeout=30)
        stack.fault(fingerprint_s=None)
        orch.start()
        # The row named the new volume before it was created: the reconciler removes it.
        wait_for(lambda: volumes(orch) == [name], timeout=30, what="the cut-short restore's volume removed")
        wait_for(lambda: LEFTOVERS not in driver_state(orch),
                 timeout=30, what="the row without leftovers")
        started = orch.client("acme").post(f"/engines/{USER}/start")  # the new process's port
        assert started.status_code == 200, started.text
        assert memory(started.json()["url"], key, "GET", "colour").content == b"red"  # untouched


def _quietly(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except httpx.HTTPError:
        pass  # the orchestrator was killed under the call


def test_a_sleeping_engine_whose_node_is_lost_is_restored_elsewhere_without_an_admit(
        tmp_path: Path) -> None:
    with closing(orchestrator(tmp_path, ORCH_NODE_LOST_RESTORE_S="1", ORCH_IDLE_SLEEP_S="1")) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        url, key = provision(api)
        assert memory(url, key, "PUT", "colour", b"blue").is_success
        assert api.post(f"/engines/{USER}/snapshots").status_code == 201
        wait_for(lambda: api.get(f"/engines/{USER}").json()["status"] == "sleeping", timeout=30,
                 what="idle sleep")
        lost = driver_state(orch)["node"]
        stack.node_lost(lost)

        # back, and maybe asleep again already (idle for 1 s)
        wait_for(lambda: moved_from(orch, lost, ("running", "sleeping")), timeout=60,
                 what="the sleeping engine restored on another node")
        trail = [(e["event"], e["reason"]) for e in api.get(f"/engines/{USER}/events").json()["events"]]
        assert ("fail", "node_lost") in trail
        admitted = api.post(f"/engines/{USER}/admit", json={"auto_wake": True}).json()
        assert admitted["admitted"], admitted
        assert memory(admitted["url"], key, "GET", "colour").content == b"blue"
