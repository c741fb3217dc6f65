"""The double as Nomad v1.10.5 behaves where a double modelled on the driver's assumptions
would not: host volumes for a non-root image, jobs, templates and kills, the eval broker,
ACLs and the smaller answers."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import httpx
import pytest

import nomad
from tests.doubles.fixture import Hashistack, served
from tests.doubles.state import node_id
from tests.harness import free_port_range, wait_for
from tests.unit.test_double import (
    MS,
    alloc_dir,
    create_volume,
    engine_get,
    job_named,
    put,
    service_entries,
    wait_check,
)

pytestmark = pytest.mark.timeout(120)
NODES = [node_id(i) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("cluster"), free_port_range(40), nodes=3,
               dev=True) as hs:
        yield hs


def client(stack: Hashistack) -> nomad.Nomad:
    return nomad.Nomad(address=stack.nomad, timeout=5)


def start(stack: Hashistack, job_id: str, edit: Callable[[dict[str, Any]], None] = lambda t: None,
          volume: dict[str, Any] | None = None) -> str:
    """Volume (unless given), variable and job; the register's EvalID."""
    if volume is None:
        create_volume(stack, job_id)
    api = client(stack)
    api.variable.create_variable(f"nomad/jobs/{job_id}", {"Items": {"api_key": "k1"}})
    body = job_named(job_id)
    edit(body["Job"]["TaskGroups"][0]["Tasks"][0])
    return api.job.register_job(job_id, body)["EvalID"]


def allocs(stack: Hashistack, job_id: str, status: str) -> list[dict[str, Any]]:
    return [a for a in client(stack).job.get_allocations(job_id) if a["ClientStatus"] == status]


def one(stack: Hashistack, job_id: str, status: str) -> dict[str, Any]:
    return wait_for(lambda: allocs(stack, job_id, status), timeout=30, what=status)[0]


def port_of(stack: Hashistack, alloc_id: str) -> int:
    alloc = client(stack).allocation.get_allocation(alloc_id)
    return int(alloc["AllocatedResources"]["Shared"]["Ports"][0]["Value"])


def stderr_of(stack: Hashistack, alloc_id: str) -> str:
    path = alloc_dir(stack, alloc_id) / "alloc" / "logs" / "engine.stderr.0"
    return path.read_text() if path.exists() else ""


def purge(stack: Hashistack, job_id: str) -> None:
    client(stack).job.deregister_job(job_id, purge=True)


# ---- what a non-root image needs --------- -------------------------------------------------

def test_volume_without_uid_is_not_writable_by_the_image(stack: Hashistack) -> None:
    create_volume(stack, "e-row1-0123456789ab", params={})   # root's, 0700
    start(stack, "e-row1-0123456789ab", volume={})
    failed = one(stack, "e-row1-0123456789ab", "failed")
    assert "Permission denied: '/brain'" in stderr_of(stack, failed["ID"])
    purge(stack, "e-row1-0123456789ab")


def test_key_template_without_uid_is_not_readable_by_the_image(stack: Hashistack) -> None:
    def root_owned(task: dict[str, Any]) -> None:
        for key in ("Uid", "Gid"):
            task["Templates"][0].pop(key)
    start(stack, "e-row2-0123456789ab", root_owned)
    failed = one(stack, "e-row2-0123456789ab", "failed")
    assert "Permission denied: 'secrets/api_key'" in stderr_of(stack, failed["ID"])
    purge(stack, "e-row2-0123456789ab")


def test_latest_is_pulled_and_a_local_image_is_not_found(stack: Hashistack) -> None:
    start(stack, "e-row3-0123456789ab", lambda t: t["Config"].update(image="orch-refengine:latest"))
    failed = one(stack, "e-row3-0123456789ab", "failed")
    [event] = [e for e in failed["TaskStates"]["engine"]["Events"] if e["DriverError"]]
    assert event["DriverError"].startswith("Failed to pull `orch-refengine:latest`")
    purge(stack, "e-row3-0123456789ab")


# ---- host volumes ------------------ -----------------------------------------------------------

def test_volumes_are_placed_in_node_order_never_upserted_and_start_pending(
        stack: Hashistack) -> None:
    body = {"Volume": {"Name": "e-vol-0123456789ab", "PluginID": "mkdir",
                       "RequestedCapabilities": [{"AccessMode": "single-node-writer",
                                                  "AttachmentMode": "file-system"}]}}
    made = []
    for _ in NODES:
        resp = put(f"{stack.nomad}/v1/volume/host/create", body)
        assert resp.status_code == 200, resp.text
        made.append(resp.json()["Volume"])
    # a new volume each time (no upsert by name), on the first node without that name
    assert [v["NodeID"] for v in made] == NODES and len({v["ID"] for v in made}) == 3
    assert made[0]["State"] == "pending"   # until the client's next fingerprint
    wait_for(lambda: all(v["state"] == "ready" for v in stack.state()["volumes"]
                         if v["name"] == "e-vol-0123456789ab"), what="fingerprint")
    full = put(f"{stack.nomad}/v1/volume/host/create", body)
    assert full.status_code == 500 and "3 nodes had existing volume" in full.text
    for volume in made:
        httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
    # a down node is still "the first in order": the client RPC fails, a 500
    stack.node_lost(NODES[0])
    try:
        down = put(f"{stack.nomad}/v1/volume/host/create", body)
        assert down.status_code == 500 and NODES[0] in down.text
        assert not [v for v in stack.state()["volumes"] if v["name"] == "e-vol-0123456789ab"]
        pinned = dict(body["Volume"], NodeID=NODES[2])
        resp = put(f"{stack.nomad}/v1/volume/host/create", {"Volume": pinned})
        assert resp.status_code == 200 and resp.json()["Volume"]["NodeID"] == NODES[2]
        httpx.delete(f"{stack.nomad}/v1/volume/host/{resp.json()['Volume']['ID']}", trust_env=False)
    finally:
        stack.node_up(NODES[0])
    bad = put(f"{stack.nomad}/v1/volume/host/create",
              {"Volume": dict(body["Volume"], Parameters={"owner": "x"})})
    assert bad.status_code == 500 and 'unknown mkdir parameter: "owner"' in bad.text


def test_volume_delete_errors_are_500s(stack: Hashistack) -> None:
    missing = httpx.delete(f"{stack.nomad}/v1/volume/host/no-such-id", trust_env=False)
    assert missing.status_code == 500 and missing.text == "no such volume: no-such-id"
    volume = create_volume(stack, "e-row5-0123456789ab", node=NODES[1])
    stack.node_lost(NODES[1])
    try:
        down = httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
        assert down.status_code == 500 and "without force=true" in down.text
    finally:
        stack.node_up(NODES[1])
    gone = httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
    assert gone.status_code == 200


# ---- jobs ---------- -------------------------------------------------------------------------

def test_job_stubs_carry_meta_only_when_asked(stack: Hashistack) -> None:
    start(stack, "e-row6-0123456789ab")
    plain = httpx.get(f"{stack.nomad}/v1/jobs", params={"prefix": "e-row6"}, trust_env=False).json()
    assert plain and "Meta" not in plain[0]
    meta = httpx.get(f"{stack.nomad}/v1/jobs", params={"prefix": "e-row6", "meta": "true"},
                     trust_env=False).json()
    assert meta[0]["Meta"]["managed_by"] == "orch"
    purge(stack, "e-row6-0123456789ab")


def test_validation_failures_are_500_and_validate_reports_them(stack: Hashistack) -> None:
    body = job_named("e-row9-0123456789ab")
    body["Job"]["TaskGroups"][0]["Services"][0]["Name"] = "bad_name"
    resp = put(f"{stack.nomad}/v1/job/e-row9-0123456789ab", body)
    assert resp.status_code == 500 and "RFC 1123" in resp.text
    stack.clear_rejections()
    check = put(f"{stack.nomad}/v1/validate/job", body).json()
    assert check["ValidationErrors"] and "RFC 1123" in check["Error"]
    good = put(f"{stack.nomad}/v1/validate/job", job_named("e-row9-0123456789ab")).json()
    assert good["ValidationErrors"] is None and good["DriverConfigValidated"]


# ---- templates and kills ------------- --------------------------------------------------------

def _keycheck(port: int, key: str) -> int:
    try:
        return engine_get(port, "/v1/keycheck", key).status_code
    except httpx.HTTPError:
        return 0


def test_default_template_timing_is_wait_5s_plus_splay(stack: Hashistack) -> None:
    def default_timing(task: dict[str, Any]) -> None:
        for key in ("Wait", "Splay"):
            task["Templates"][0].pop(key)
    start(stack, "e-row10-0123456789ab", default_timing)
    port = port_of(stack, one(stack, "e-row10-0123456789ab", "running")["ID"])
    wait_for(lambda: _keycheck(port, "k1") == 200, what="boot")
    client(stack).variable.create_variable("nomad/jobs/e-row10-0123456789ab",
                                           {"Items": {"api_key": "k2"}})
    written = time.monotonic()
    wait_for(lambda: _keycheck(port, "k2") == 200, timeout=15, interval=0.1, what="the new key")
    assert time.monotonic() - written >= 5.0   # Wait.Min 5s, then up to 5s of splay
    purge(stack, "e-row10-0123456789ab")


def test_a_paused_task_gets_only_the_kill_signal_then_sigkill(stack: Hashistack) -> None:
    start(stack, "e-row11-0123456789ab", lambda t: t.update(KillTimeout=1000 * MS))
    alloc = one(stack, "e-row11-0123456789ab", "running")
    [pid] = next(a for a in stack.state()["allocs"] if a["id"] == alloc["ID"])["pids"].values()
    client(stack).client.allocation.signal_allocation(alloc["ID"], "SIGSTOP", task="engine")
    # kill(2) only queues SIGSTOP; a SIGTERM queued before the process next runs is dequeued
    # first (lower number), so the purge waits until the kernel has really stopped it.
    wait_for(lambda: _proc_state(pid) == "T", what="the engine stopped")
    purge(stack, "e-row11-0123456789ab")
    done = wait_for(lambda: allocs(stack, "e-row11-0123456789ab", "complete"), what="stopped")[0]
    terminated = [e for e in done["TaskStates"]["engine"]["Events"] if e["Type"] == "Terminated"]
    assert terminated[-1]["Signal"] == signal.SIGKILL   # SIGTERM never reached it


# ---- the eval broker -------- -----------------------------------------------------------------

def test_superseded_evals_are_canceled_and_the_newest_places(stack: Hashistack) -> None:
    create_volume(stack, "e-row12-0123456789ab")
    client(stack).variable.create_variable("nomad/jobs/e-row12-0123456789ab",
                                           {"Items": {"api_key": "k1"}})
    stack.fault(eval_delay_s=0.3)
    try:
        evals = []
        for version in ("a", "b", "c"):
            body = job_named("e-row12-0123456789ab")
            body["Job"]["Meta"]["engine_version"] = version
            evals.append(client(stack).job.register_job("e-row12-0123456789ab", body)["EvalID"])
        final = [wait_for(lambda e=e: _done(stack, e), what="evals") for e in evals]
    finally:
        stack.fault(eval_delay_s=0)
    assert [e["Status"] for e in final] == ["complete", "canceled", "complete"]
    assert final[1]["StatusDescription"] == "canceled after more recent eval was processed"
    # A worker reads the job when it takes the eval (the scheduler's state snapshot): the
    # first eval already placed the newest version, so the last one had nothing to do.
    [running] = [one(stack, "e-row12-0123456789ab", "running")]
    alloc = client(stack).allocation.get_allocation(running["ID"])
    assert alloc["Job"]["Meta"]["engine_version"] == "c"
    assert len(client(stack).job.get_allocations("e-row12-0123456789ab")) == 1
    purge(stack, "e-row12-0123456789ab")


def _done(stack: Hashistack, eval_id: str) -> dict[str, Any] | None:
    ev = client(stack).evaluation.get_evaluation(eval_id)
    return ev if ev["Status"] in ("complete", "canceled", "failed") else None


# ---- ACLs -------- ----------------------------------------------------------------------------

def test_acls_answer_403_per_capability(stack: Hashistack) -> None:
    stack.acl({"writer": {"namespace": ["list-jobs"],
                          "variables": {"nomad/jobs/*": ["write", "read"]}}})
    try:
        def call(method: str, path: str, token: str | None, body: Any = None) -> httpx.Response:
            headers = {"X-Nomad-Token": token} if token else {}
            return httpx.request(method, stack.nomad + path, json=body, headers=headers,
                                 trust_env=False)
        var = {"Items": {"a": "1"}}
        assert call("PUT", "/v1/var/nomad/jobs/acl", "writer", var).status_code == 200
        denied = call("DELETE", "/v1/var/nomad/jobs/acl", "writer")   # needs destroy
        assert (denied.status_code, denied.text) == (403, "Permission denied")
        assert call("GET", "/v1/vars?prefix=nomad/jobs/acl", "writer").json() == []   # no list
        assert call("GET", "/v1/jobs", None).status_code == 403            # anonymous
        unknown = call("GET", "/v1/jobs", "nope")
        assert (unknown.status_code, unknown.text) == (403, "ACL token not found")
        assert call("GET", "/v1/jobs", "writer").status_code == 200
        assert call("PUT", "/v1/volume/host/create", "writer",
                    {"Volume": {"Name": "x", "PluginID": "mkdir"}}).status_code == 403
    finally:
        stack.acl(None)
    assert httpx.delete(f"{stack.nomad}/v1/var/nomad/jobs/acl", trust_env=False).status_code == 204


# ---- the smaller ones -------- ---------------------------------------------------------------

def test_signal_unknown_task_is_500_and_variable_delete_is_204(stack: Hashistack) -> None:
    start(stack, "e-row14-0123456789ab")
    alloc = one(stack, "e-row14-0123456789ab", "running")
    stack.clear_rejections()
    resp = put(f"{stack.nomad}/v1/client/allocation/{alloc['ID']}/signal",
               {"Signal": "SIGHUP", "Task": "nope"})
    assert resp.status_code == 500 and "task not found" in resp.text
    stack.clear_rejections()
    purge(stack, "e-row14-0123456789ab")
    resp = httpx.delete(f"{stack.nomad}/v1/var/nomad/jobs/e-row14-0123456789ab", trust_env=False)
    assert resp.status_code == 204 and resp.content == b""


def test_signals_reach_the_main_process_only(stack: Hashistack, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                      "print(child.pid, flush=True)\ntime.sleep(300)\n")

    def raw(task: dict[str, Any]) -> None:
        task.update(Driver="raw_exec", Config={"command": sys.executable, "args": [str(script)]},
                    VolumeMounts=None, KillTimeout=1000 * MS)
    start(stack, "e-sig-0123456789ab", raw)
    alloc = one(stack, "e-sig-0123456789ab", "running")
    out = alloc_dir(stack, alloc["ID"]) / "alloc" / "logs" / "engine.stdout.0"
    child = int(wait_for(lambda: out.exists() and out.read_text().strip(), what="child pid"))
    parent = stack.state()
    [pid] = next(a for a in parent["allocs"] if a["id"] == alloc["ID"])["pids"].values()
    client(stack).client.allocation.signal_allocation(alloc["ID"], "SIGSTOP", task="engine")
    wait_for(lambda: _proc_state(pid) == "T", what="the main process stopped")
    assert _proc_state(child) != "T"
    client(stack).client.allocation.signal_allocation(alloc["ID"], "SIGCONT", task="engine")
    purge(stack, "e-sig-0123456789ab")
    wait_for(lambda: _proc_state(child) in ("gone", "Z"), what="the group killed at the end")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_lost_allocs_are_replaced_once_their_volume_is_back(stack: Hashistack) -> None:
    volume = create_volume(stack, "e-lost-0123456789ab", node=NODES[2])
    start(stack, "e-lost-0123456789ab", volume=volume)
    first = one(stack, "e-lost-0123456789ab", "running")
    assert first["NodeID"] == NODES[2]   # where its volume is
    assert stack.node_lost(NODES[2]) == [first["ID"]]
    assert client(stack).allocation.get_allocation(first["ID"])["ClientStatus"] == "lost"
    evals = client(stack).job.get_evaluations("e-lost-0123456789ab")
    update = [e for e in evals if e["TriggeredBy"] == "node-update"]
    assert update and update[0]["FailedTGAllocs"]["engine"]["ConstraintFiltered"] == \
        {"missing compatible host volumes": 2}
    assert [v["state"] for v in stack.state()["volumes"] if v["id"] == volume["ID"]] == ["unavailable"]
    stack.node_up(NODES[2])
    second = one(stack, "e-lost-0123456789ab", "running")
    assert second["ID"] != first["ID"] and second["NodeID"] == NODES[2]
    purge(stack, "e-lost-0123456789ab")


def test_ports_are_random_and_consul_indexes_are_per_service(stack: Hashistack) -> None:
    cons = consul.Consul(host="127.0.0.1", port=int(stack.consul.rsplit(":", 1)[1]))
    ports = []
    for name in ("e-pa-0123456789ab", "e-pb-0123456789ab", "e-pc-0123456789ab"):
        start(stack, name)
        ports.append(port_of(stack, one(stack, name, "running")["ID"]))
    low = stack.port_range[0]
    assert sorted(ports) != [low, low + 1, low + 2]   # 1 in ~9,880 by chance
    wait_check(cons, "e-pa-0123456789ab", "passing")
    index, _ = cons.health.service("e-pa-0123456789ab")
    purge(stack, "e-pb-0123456789ab")   # another service changes: not a change of this one
    wait_for(lambda: not service_entries(cons, "e-pb-0123456789ab"), what="pb gone")
    again, _ = cons.health.service("e-pa-0123456789ab", index=index, wait="1s")
    assert again == index
    for name in ("e-pa-0123456789ab", "e-pc-0123456789ab"):
        purge(stack, name)
