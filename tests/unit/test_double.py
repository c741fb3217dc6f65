"""The Nomad + Consul test double (tests/doubles) is strict and faithful: it refuses what real
Nomad would silently misread, and really runs what it accepts (the reference engine as the
"docker" task, its checks, templates, signals)."""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import httpx
import nomad.api.exceptions
import pytest

import nomad
from tests.doubles.fixture import Hashistack, served
from tests.harness import free_port_range, wait_for

pytestmark = pytest.mark.timeout(90)
JOB_ID = "e-acme-alice-0123456789ab"
IMAGE = "orch-refengine:0.1.0"   # a real tag: `latest` is always pulled, and fails
NOBODY = 65534                    # the user the image runs as (jobspecs/Dockerfile.refengine)
MS = 1_000_000
VAR_PATH = f"nomad/jobs/{JOB_ID}"
DOCKER_JOB: dict[str, Any] = {"Job": {
    "ID": JOB_ID, "Name": JOB_ID, "Type": "service", "Datacenters": ["*"],
    "Meta": {"product": "acme", "user_id": "alice", "engine_version": IMAGE,
             "managed_by": "orch"},
    "TaskGroups": [{
        "Name": "engine", "Count": 1,
        "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": "http"}]}],
        "Volumes": {"brain": {"Name": "brain", "Type": "host", "Source": JOB_ID,
                              "AccessMode": "single-node-writer",
                              "AttachmentMode": "file-system"}},
        "RestartPolicy": {"Attempts": 2, "Interval": 300000000000, "Delay": 1000000000,
                          "Mode": "fail"},
        "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
        "Services": [{"Name": JOB_ID, "PortLabel": "http", "Provider": "consul",
                      "Tags": ["orch", "product-acme"],
                      "Meta": {"product": "acme", "user_id": "alice"},
                      "Checks": [{"Name": "health", "Type": "http", "Path": "/health",
                                  "Interval": 1000000000, "Timeout": 1000000000}]}],
        "Tasks": [{
            "Name": "engine", "Driver": "docker",
            "Config": {"image": IMAGE, "ports": ["http"]},
            "Env": {"ENGINE_PORT": "${NOMAD_PORT_http}", "ENGINE_HOST": "0.0.0.0",
                    "ENGINE_BRAIN_DIR": "/brain",
                    "ENGINE_API_KEY_FILE": "${NOMAD_SECRETS_DIR}/api_key",
                    "ENGINE_USER_ID": "alice", "ENGINE_VERSION": IMAGE},
            "VolumeMounts": [{"Volume": "brain", "Destination": "/brain"}],
            "Templates": [{"EmbeddedTmpl": '{{ with nomadVar "' + VAR_PATH +
                           '" }}{{ .api_key }}{{ end }}',
                           "DestPath": "secrets/api_key", "ChangeMode": "signal",
                           "ChangeSignal": "SIGHUP", "Perms": "0600", "Uid": NOBODY,
                           "Gid": NOBODY, "Splay": 0, "Wait": {"Min": 100 * MS,
                                                              "Max": 500 * MS}}],
            "KillTimeout": 30000000000, "KillSignal": "SIGTERM",
            "Resources": {"CPU": 100, "MemoryMB": 128}}]}]}}


def job_named(job_id: str) -> dict[str, Any]:
    body = copy.deepcopy(DOCKER_JOB)
    job = body["Job"]
    job["ID"] = job["Name"] = job_id
    job["TaskGroups"][0]["Volumes"]["brain"]["Source"] = job_id
    job["TaskGroups"][0]["Services"][0]["Name"] = job_id
    tmpl = job["TaskGroups"][0]["Tasks"][0]["Templates"][0]
    tmpl["EmbeddedTmpl"] = tmpl["EmbeddedTmpl"].replace(JOB_ID, job_id)
    return body


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("double"), free_port_range(3),
               dev=True) as hs:
        yield hs


def put(url: str, body: Any) -> httpx.Response:
    return httpx.put(url, json=body, timeout=10, trust_env=False)


def create_volume(stack: Hashistack, name: str, node: str | None = None,
                  params: dict[str, str] | None = None) -> dict[str, Any]:
    """A volume the image's user can write (unless `params` says otherwise), once ready."""
    spec: dict[str, Any] = {
        "Name": name, "PluginID": "mkdir", "RequestedCapabilities": [
            {"AccessMode": "single-node-writer", "AttachmentMode": "file-system"}],
        "Parameters": {"uid": str(NOBODY), "gid": str(NOBODY)} if params is None else params}
    if node:
        spec["NodeID"] = node
    resp = put(f"{stack.nomad}/v1/volume/host/create", {"Volume": spec})
    assert resp.status_code == 200, resp.text
    volume = resp.json()["Volume"]
    return wait_for(lambda: _ready(stack, volume["ID"]), what="the volume to be ready")


def _ready(stack: Hashistack, volume_id: str) -> dict[str, Any] | None:
    volume = httpx.get(f"{stack.nomad}/v1/volume/host/{volume_id}", trust_env=False).json()
    return volume if volume["State"] == "ready" else None


# ---- strictness --------------------------------------------------------------------------

def test_misspelled_field_is_refused_and_recorded(stack: Hashistack) -> None:
    stack.clear_rejections()
    body = copy.deepcopy(DOCKER_JOB)
    group = body["Job"]["TaskGroups"][0]
    group["Tasks"][0]["Drvier"] = group["Tasks"][0].pop("Driver")
    group["Imgae"] = "x"
    resp = put(f"{stack.nomad}/v1/job/{JOB_ID}", body)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("text/plain")
    assert 'unknown field "Drvier"' in resp.text and 'unknown field "Imgae"' in resp.text
    assert "Job.TaskGroups[0].Tasks[0]" in resp.text
    [rejection] = stack.rejections()
    assert rejection["method"] == "PUT" and rejection["path"] == f"/v1/job/{JOB_ID}"
    assert any("Drvier" in e for e in rejection["errors"])
    assert JOB_ID not in stack.state()["jobs"]


def test_wrong_case_and_null_are_refused(stack: Hashistack) -> None:
    body = copy.deepcopy(DOCKER_JOB)
    body["Job"]["id"] = body["Job"].pop("ID")
    resp = put(f"{stack.nomad}/v1/jobs", body)
    assert resp.status_code == 400 and 'did you mean "ID"' in resp.text
    body = copy.deepcopy(DOCKER_JOB)
    body["Job"]["TaskGroups"][0]["Tasks"][0]["Driver"] = None
    assert put(f"{stack.nomad}/v1/jobs", body).status_code == 400
    resp = httpx.put(f"{stack.nomad}/v1/jobs", content=b"{not json", trust_env=False)
    assert resp.status_code == 400


@pytest.mark.parametrize("where", ["check", "kill"])
def test_string_duration_is_refused(stack: Hashistack, where: str) -> None:
    body = copy.deepcopy(DOCKER_JOB)
    group = body["Job"]["TaskGroups"][0]
    if where == "check":
        group["Services"][0]["Checks"][0]["Interval"] = "10s"
    else:
        group["Tasks"][0]["KillTimeout"] = "30s"
    resp = put(f"{stack.nomad}/v1/jobs", body)
    assert resp.status_code == 400, resp.text
    assert "time.Duration" in resp.text and "nanoseconds" in resp.text


def test_bare_job_is_refused(stack: Hashistack) -> None:
    resp = put(f"{stack.nomad}/v1/jobs", DOCKER_JOB["Job"])
    assert resp.status_code == 400 and "Job must be specified" in resp.text
    assert any(r["errors"] == ["Job must be specified"] for r in stack.rejections())


def test_id_must_match_url_and_missing_job_delete(stack: Hashistack) -> None:
    resp = put(f"{stack.nomad}/v1/job/other-id", DOCKER_JOB)
    assert resp.status_code == 400
    resp = httpx.delete(f"{stack.nomad}/v1/job/no-such-job", trust_env=False)
    assert resp.status_code == 200 and resp.json()["EvalID"] == ""
    resp = httpx.get(f"{stack.nomad}/v1/job/no-such-job", trust_env=False)
    assert resp.status_code == 404 and resp.text == "job not found"


def test_variable_cas_conflict(stack: Hashistack) -> None:
    client = nomad.Nomad(address=stack.nomad, timeout=5)
    path = "nomad/jobs/cas-test"
    created = client.variable.create_variable(path, {"Path": path, "Items": {"a": "1"}}, cas=0)
    with pytest.raises(nomad.api.exceptions.VariableConflict) as info:
        client.variable.create_variable(path, {"Path": path, "Items": {"a": "2"}}, cas=0)
    assert info.value.nomad_resp.status_code == 409
    assert info.value.nomad_resp.json()["Items"] == {"a": "1"}
    resp = httpx.delete(f"{stack.nomad}/v1/var/{path}?cas={created['ModifyIndex'] + 99}",
                        trust_env=False)
    assert resp.status_code == 409
    client.variable.create_variable(path, {"Path": path, "Items": {"a": "3"}},
                                    cas=created["ModifyIndex"])
    assert client.variable.get_variable(path)["Items"] == {"a": "3"}
    listed = httpx.get(f"{stack.nomad}/v1/vars?prefix=nomad/jobs/cas", trust_env=False).json()
    assert [v["Path"] for v in listed] == [path] and "Items" not in listed[0]


# ---- the happy path ----------------------------------------------------------------------

def service_entries(cons: consul.Consul, name: str, passing: bool = False) -> list[Any]:
    return cons.health.service(name, passing=passing)[1]


def wait_check(cons: consul.Consul, name: str, status: str, timeout: float = 10.0) -> None:
    """Wait (with blocking queries) until the service's "health" check has `status`."""
    deadline = time.monotonic() + timeout
    index = None
    while time.monotonic() < deadline:
        index, entries = cons.health.service(name, index=index, wait="2s")
        checks = [c for e in entries for c in e["Checks"] if c["Name"] == "health"]
        if checks and all(c["Status"] == status for c in checks):
            return
    raise AssertionError(f"check of {name} never became {status}")


def engine_get(port: int, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=3,
                     trust_env=False)


def test_docker_job_lifecycle(stack: Hashistack) -> None:
    client = nomad.Nomad(address=stack.nomad, timeout=5)
    cons = consul.Consul(host="127.0.0.1", port=int(stack.consul.rsplit(":", 1)[1]))
    volume = create_volume(stack, JOB_ID)
    assert volume["State"] == "ready" and oct(os.stat(volume["HostPath"]).st_mode)[-3:] == "700"
    client.variable.create_variable(VAR_PATH, {"Path": VAR_PATH, "Items": {"api_key": "k1"}})
    reg = client.job.register_job(JOB_ID, copy.deepcopy(DOCKER_JOB))
    ev = client.evaluation.get_evaluation(reg["EvalID"])
    assert ev["Status"] == "complete" and not ev["FailedTGAllocs"]
    [stub] = client.job.get_allocations(JOB_ID)
    assert "AllocatedResources" not in stub
    alloc = client.allocation.get_allocation(stub["ID"])
    [port] = alloc["AllocatedResources"]["Shared"]["Ports"]
    assert port["Label"] == "http" and port["HostIP"] == "127.0.0.1"
    port_no = port["Value"]
    wait_check(cons, JOB_ID, "passing")
    [entry] = service_entries(cons, JOB_ID, passing=True)
    assert entry["Service"]["Port"] == port_no and "orch" in entry["Service"]["Tags"]
    assert engine_get(port_no, "/health").status_code == 200
    assert engine_get(port_no, "/v1/keycheck", "k1").status_code != 401
    key_file = Path(alloc_dir(stack, stub["ID"])) / "engine" / "secrets" / "api_key"
    assert oct(key_file.stat().st_mode)[-3:] == "600"

    # Same job again: a no-op, not a second alloc.
    client.job.register_job(JOB_ID, copy.deepcopy(DOCKER_JOB))
    assert len(client.job.get_allocations(JOB_ID)) == 1

    # Rotate the key: the template re-renders and SIGHUPs the engine.
    client.variable.create_variable(VAR_PATH, {"Path": VAR_PATH, "Items": {"api_key": "k2"}})
    wait_for(lambda: engine_get(port_no, "/v1/keycheck", "k2").status_code == 200,
               what="the engine to accept k2")
    assert engine_get(port_no, "/v1/keycheck", "k1").status_code == 401

    # Pause and resume through the signal API: the check follows.
    client.client.allocation.signal_allocation(stub["ID"], "SIGSTOP", task="engine")
    wait_check(cons, JOB_ID, "critical")
    client.client.allocation.signal_allocation(stub["ID"], "SIGCONT", task="engine")
    wait_check(cons, JOB_ID, "passing")

    logs = httpx.get(f"{stack.nomad}/v1/client/fs/logs/{stub['ID']}",
                     params={"task": "engine", "type": "stdout", "plain": "true",
                             "origin": "start"}, trust_env=False)
    assert "listening on 127.0.0.1" in logs.text and "reloaded key" in logs.text

    # Deregister with purge: the process and the service go, the volume can be deleted.
    pid = engine_get(port_no, "/v1/info", "k2").json()["pid"]
    resp = httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
    assert resp.status_code == 500 and "in use by allocations" in resp.text
    client.job.deregister_job(JOB_ID, purge=True)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), what="engine exit")
    wait_for(lambda: not service_entries(cons, JOB_ID), what="service deregistration")
    with pytest.raises(nomad.api.exceptions.URLNotFoundNomadException):
        client.job.get_job(JOB_ID)
    assert client.allocation.get_allocation(stub["ID"])["ClientStatus"] == "complete"
    resp = httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
    assert resp.status_code == 200 and not Path(volume["HostPath"]).exists()
    resp = httpx.delete(f"{stack.nomad}/v1/volume/host/{volume['ID']}", trust_env=False)
    assert resp.status_code == 500 and resp.text == f"no such volume: {volume['ID']}"


def alloc_dir(stack: Hashistack, alloc_id: str) -> Path:
    return stack.data_dir / "allocs" / alloc_id


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_engine_turns_check_critical(stack: Hashistack) -> None:
    client = nomad.Nomad(address=stack.nomad, timeout=5)
    cons = consul.Consul(host="127.0.0.1", port=int(stack.consul.rsplit(":", 1)[1]))
    job_id = "e-acme-bob-0123456789ab"
    create_volume(stack, job_id)
    client.variable.create_variable(f"nomad/jobs/{job_id}", {"Items": {"api_key": "kb"}})
    client.job.register_job(job_id, job_named(job_id))
    wait_check(cons, job_id, "passing")
    [stub] = client.job.get_allocations(job_id)
    port_no = client.allocation.get_allocation(stub["ID"])["AllocatedResources"]["Shared"][
        "Ports"][0]["Value"]
    pid = engine_get(port_no, "/v1/info", "kb").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_check(cons, job_id, "critical")
    events = client.allocation.get_allocation(stub["ID"])["TaskStates"]["engine"]["Events"]
    assert any(e["Type"] == "Terminated" and e["Signal"] == 9 for e in events)
    client.job.deregister_job(job_id, purge=True)
    wait_for(lambda: not service_entries(cons, job_id), what="service deregistration")


def test_nomad_down_refuses_connections_then_returns(stack: Hashistack) -> None:
    stack.fault(nomad_down=True)
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{stack.nomad}/v1/status/leader", trust_env=False)
    finally:
        stack.fault(nomad_down=False)
    assert httpx.get(f"{stack.nomad}/v1/status/leader", trust_env=False).json() == \
        "127.0.0.1:4647"


# ---- placement failures ------------------------------------------------------------------

def test_ports_exhausted_is_a_failed_placement(tmp_path: Path) -> None:
    with Hashistack(tmp_path, free_port_range(1), dev=True) as hs:
        client = nomad.Nomad(address=hs.nomad, timeout=5)
        for job_id in ("e-one-0123456789ab", "e-two-0123456789ab"):
            create_volume(hs, job_id)
            client.variable.create_variable(f"nomad/jobs/{job_id}", {"Items": {"api_key": "k"}})
            reg = client.job.register_job(job_id, job_named(job_id))
        ev = client.evaluation.get_evaluation(reg["EvalID"])
        assert ev["Status"] == "complete" and ev["BlockedEval"]
        metric = ev["FailedTGAllocs"]["engine"]
        assert metric["DimensionExhausted"] == {"network: dynamic port selection failed": 1}
        assert metric["NodesExhausted"] == 1
        assert client.job.get_allocations("e-two-0123456789ab") == []
        # No host volume: filtered out by constraint.
        reg = client.job.register_job("e-three-0123456789ab", job_named("e-three-0123456789ab"))
        metric = client.evaluation.get_evaluation(reg["EvalID"])["FailedTGAllocs"]["engine"]
        assert metric["ConstraintFiltered"] == {"missing compatible host volumes": 1}
    assert not hs.stragglers()


def test_failures_faults_and_node_loss(tmp_path: Path) -> None:
    with Hashistack(tmp_path, free_port_range(3), dev=True) as hs:
        client = nomad.Nomad(address=hs.nomad, timeout=5)
        cons = consul.Consul(host="127.0.0.1", port=int(hs.consul.rsplit(":", 1)[1]))

        def start(job_id: str, edit: Callable[[dict[str, Any]], None] = lambda t: None) -> str:
            create_volume(hs, job_id)
            client.variable.create_variable(f"nomad/jobs/{job_id}", {"Items": {"api_key": "k"}})
            body = job_named(job_id)
            edit(body["Job"]["TaskGroups"][0]["Tasks"][0])
            return client.job.register_job(job_id, body)["EvalID"]

        def status_of(job_id: str, status: str) -> dict[str, Any]:
            return wait_for(lambda: [a for a in client.job.get_allocations(job_id)
                                       if a["ClientStatus"] == status], what=status)[0]

        # raw_exec cannot mount the host volume (gotcha 7).
        start("e-raw-0123456789ab", lambda t: t.update(
            Driver="raw_exec", Config={"command": "/bin/true", "args": []}))
        failed = status_of("e-raw-0123456789ab", "failed")
        [event] = [e for e in failed["TaskStates"]["engine"]["Events"] if e["DriverError"]]
        assert 'task driver "raw_exec" for "engine" does not support host volumes' in \
            event["DriverError"]
        # A typo in the driver config fails the task too.
        start("e-typo-0123456789ab", lambda t: t["Config"].update(imgae="x"))
        status_of("e-typo-0123456789ab", "failed")

        # Memory exhausted: a failed placement, not an HTTP error.
        hs.fault(memory_exhausted=True)
        metric = client.evaluation.get_evaluation(start("e-mem-0123456789ab"))["FailedTGAllocs"]
        assert metric["engine"]["DimensionExhausted"] == {"memory": 1}
        hs.fault(memory_exhausted=False)

        # Crashing tasks: restarted per policy (2 attempts), then the alloc fails.
        hs.fault(task_crash=True)
        start("e-crash-0123456789ab")
        crashed = status_of("e-crash-0123456789ab", "failed")["TaskStates"]["engine"]
        assert crashed["Restarts"] == 2 and crashed["Events"][-1]["Type"] == "Not Restarting"
        hs.fault(task_crash=False)

        # A healthy engine, then the node is lost: alloc lost, process killed, service gone.
        start("e-lost-0123456789ab")
        wait_check(cons, "e-lost-0123456789ab", "passing")
        [alloc_id] = hs.node_lost()
        assert client.allocation.get_allocation(alloc_id)["ClientStatus"] == "lost"
        wait_for(lambda: not service_entries(cons, "e-lost-0123456789ab"), what="dereg")
        wait_for(lambda: not hs.stragglers(), what="the lost engine to die")
        calls = {(r["api"], r["method"], r["route"]): r["count"] for r in hs.requests()}
        assert calls[("nomad", "POST", "/v1/job/{job_id}")] == 5   # python-nomad POSTs
