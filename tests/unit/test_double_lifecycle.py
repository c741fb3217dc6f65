"""Lifecycle tasks on the double, in Nomad 1.10.5's order (tests/doubles/lifecycle.py): real
processes on raw_exec, start times read from the TaskStates' events, never from sleeps."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import nomad
from tests.doubles import drivers
from tests.doubles.fixture import Hashistack, served
from tests.doubles.state import node_id
from tests.harness import free_port_range, wait_for
from tests.unit.test_double import MS, create_volume, put

pytestmark = pytest.mark.timeout(120)

# A main task that refuses to run unless the prestart task's file is there at its start.
MAIN = ("import os, sys, time\n"
        "p = os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'ready')\n"
        "open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'main-ran'), 'w').close()\n"
        "sys.exit(3) if not os.path.exists(p) else time.sleep(600)\n")
INIT = ("import os, time\ntime.sleep(0.3)\n"
        "open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'ready'), 'w').close()\n")
SLEEP = "import time; time.sleep(600)"
# Writes when SIGTERM arrives, then takes 0.3 s to exit: the next stage must wait for it.
TERM = ("import os, signal, sys, time\n"
        "def bye(*_):\n"
        "    open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], os.environ['NOMAD_TASK_NAME']"
        " + '.term'), 'w').write(str(time.time_ns()))\n"
        "    time.sleep(0.3); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], os.environ['NOMAD_TASK_NAME']"
        " + '.up'), 'w').close()\ntime.sleep(600)\n")
POSTSTOP = ("import os, time\n"
            "open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'poststop.start'), 'w')"
            ".write(str(time.time_ns()))\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about order, not the production client's waits
    with served(tmp_path_factory.mktemp("lifecycle"), free_port_range(20), nodes=1,
                dev=True) as hs:
        yield hs


def task(name: str, code: str, hook: str | None = None, sidecar: bool = False,
         **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": name, "Driver": "raw_exec", "KillTimeout": 2000 * MS,
                           "Config": {"command": sys.executable, "args": ["-c", code]}, **extra}
    if hook:
        out["Lifecycle"] = {"Hook": hook, "Sidecar": sidecar}
    return out


def job(job_id: str, *tasks: dict[str, Any]) -> dict[str, Any]:
    return {"Job": {"ID": job_id, "Name": job_id, "Type": "service", "Datacenters": ["*"],
                    "TaskGroups": [{"Name": "g", "Count": 1, "Tasks": list(tasks),
                                    "RestartPolicy": {"Attempts": 0, "Interval": 60_000 * MS,
                                                      "Delay": 100 * MS, "Mode": "fail"}}]}}


def register(stack: Hashistack, body: dict[str, Any]) -> None:
    resp = put(f"{stack.nomad}/v1/job/{body['Job']['ID']}", body)
    assert resp.status_code == 200, resp.text


def api(stack: Hashistack) -> nomad.Nomad:
    return nomad.Nomad(address=stack.nomad, timeout=5)


def alloc_when(stack: Hashistack, job_id: str, ok: Any, what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for stub in api(stack).job.get_allocations(job_id):
            alloc: dict[str, Any] = api(stack).allocation.get_allocation(stub["ID"])
            if ok(alloc):
                return alloc
        return None
    return wait_for(probe, timeout=20, what=what)


def event_time(alloc: dict[str, Any], name: str, kind: str) -> int:
    return next(e["Time"] for e in alloc["TaskStates"][name]["Events"] if e["Type"] == kind)


def kinds(alloc: dict[str, Any], name: str) -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][name]["Events"]]


def adir(stack: Hashistack, alloc: dict[str, Any]) -> Path:
    return stack.data_dir / "allocs" / alloc["ID"] / "alloc"


def test_prestart_completes_before_main_and_poststart_follows(stack: Hashistack) -> None:
    register(stack, job("lc-order", task("main", MAIN), task("init", INIT, "prestart"),
                        task("side", SLEEP, "poststart", sidecar=True)))
    alloc = alloc_when(stack, "lc-order", lambda a: a["TaskStates"]["side"]["State"] == "running",
                       "the poststart sidecar running")
    states = alloc["TaskStates"]
    # the prestart task ended (exit 0) before main started; main saw its file and runs
    assert event_time(alloc, "init", "Terminated") <= event_time(alloc, "main", "Started")
    assert event_time(alloc, "main", "Started") <= event_time(alloc, "side", "Started")
    assert states["init"]["State"] == "dead" and not states["init"]["Failed"]
    assert states["init"]["Restarts"] == 0 and "Restarting" not in kinds(alloc, "init")
    assert states["main"]["State"] == "running" and states["main"]["Restarts"] == 0
    assert alloc["ClientStatus"] == "running"
    assert alloc["AllocatedResources"]["TaskLifecycles"] == {
        "main": None, "init": {"Hook": "prestart", "Sidecar": False},
        "side": {"Hook": "poststart", "Sidecar": True}}
    api(stack).job.deregister_job("lc-order", purge=True)


def test_failed_prestart_fails_the_alloc_and_main_never_starts(stack: Hashistack) -> None:
    register(stack, job("lc-fail", task("main", MAIN),
                        task("init", "import sys; sys.exit(1)", "prestart")))
    alloc = alloc_when(stack, "lc-fail", lambda a: a["ClientStatus"] == "failed"
                       and a["TaskStates"]["main"]["State"] == "dead", "the alloc failed")
    assert alloc["TaskStates"]["init"]["Failed"]
    assert "Not Restarting" in kinds(alloc, "init")
    assert kinds(alloc, "main") == ["Received", "Sibling Task Failed", "Killing"]
    assert not (adir(stack, alloc) / "main-ran").exists()
    api(stack).job.deregister_job("lc-fail", purge=True)


def test_stop_kills_main_then_sidecars_then_runs_poststop(stack: Hashistack) -> None:
    register(stack, job("lc-kill", task("main", TERM),
                        task("side", TERM, "prestart", sidecar=True),
                        task("after", POSTSTOP, "poststop")))
    alloc_when(stack, "lc-kill", lambda a: all((adir(stack, a) / f"{n}.up").exists()
                                               for n in ("main", "side")),
               "main and its sidecar handling SIGTERM")
    api(stack).job.deregister_job("lc-kill")
    alloc = alloc_when(stack, "lc-kill", lambda a: a["ClientStatus"] == "complete",
                       "the alloc complete after its poststop task")
    files = {n: int((adir(stack, alloc) / n).read_text())
             for n in ("main.term", "side.term", "poststop.start")}
    # main got SIGTERM first and took 0.3 s to exit; the sidecar was only told after that
    assert files["side.term"] - files["main.term"] >= 250 * MS
    assert files["poststop.start"] - files["side.term"] >= 250 * MS
    assert alloc["TaskStates"]["after"]["State"] == "dead"
    assert not alloc["TaskStates"]["after"]["Failed"]


def test_a_sidecar_out_of_restarts_fails_the_alloc(stack: Hashistack) -> None:
    side = task("side", "import sys; sys.exit(0)", "poststart", sidecar=True,
                RestartPolicy={"Attempts": 1, "Interval": 60_000 * MS, "Delay": 100 * MS,
                               "Mode": "fail"})
    register(stack, job("lc-side", task("main", SLEEP), side))
    alloc = alloc_when(stack, "lc-side", lambda a: a["ClientStatus"] == "failed"
                       and a["TaskStates"]["main"]["State"] == "dead", "the alloc failed")
    # a sidecar restarts even after exit 0 (restarts.go onSuccess), within its policy
    assert alloc["TaskStates"]["side"]["Restarts"] == 1
    assert alloc["TaskStates"]["side"]["Failed"]
    assert "Sibling Task Failed" in kinds(alloc, "main")
    api(stack).job.deregister_job("lc-side", purge=True)


@pytest.mark.parametrize(("lifecycle", "message"), [
    ({"Hook": "", "Sidecar": True}, "Lifecycle validation failed: no lifecycle hook provided"),
    ({"Hook": "prestop", "Sidecar": False}, "Lifecycle validation failed: invalid hook: prestop"),
])
def test_lifecycle_is_validated_at_register(stack: Hashistack, lifecycle: dict[str, Any],
                                            message: str) -> None:
    body = job("lc-bad", task("main", SLEEP), task("init", INIT))
    body["Job"]["TaskGroups"][0]["Tasks"][1]["Lifecycle"] = lifecycle
    resp = put(f"{stack.nomad}/v1/job/lc-bad", body)
    assert resp.status_code == 500 and message in resp.text
    check = put(f"{stack.nomad}/v1/validate/job", body).json()
    assert message in check["Error"] and check["ValidationErrors"]
    assert "lc-bad" not in {j["ID"] for j in api(stack).jobs.get_jobs()}


def test_two_leaders_are_refused_and_a_group_without_main_is_taken(stack: Hashistack) -> None:
    body = job("lc-lead", task("a", SLEEP, Leader=True), task("b", SLEEP, Leader=True))
    resp = put(f"{stack.nomad}/v1/validate/job", body).json()
    assert "Only one task may be marked as leader" in resp["Error"]
    only_sidecars = job("lc-nomain", task("a", SLEEP, "prestart", sidecar=True))
    assert put(f"{stack.nomad}/v1/validate/job", only_sidecars).json()["ValidationErrors"] is None


# ---- docker: command, entrypoint, addresses ------------------------------------------------

ENV_DUMP = ("import json, os, sys\n"
            "keys = [k for k in os.environ if k.startswith(('NOMAD_PORT_', 'NOMAD_IP_',"
            " 'NOMAD_ADDR_', 'BIND'))]\n"
            "json.dump({'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in keys}},"
            " open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'env.json'), 'w'))\n"
            "import time; time.sleep(600)\n")


def test_docker_entrypoint_and_command_run_in_the_container(stack: Hashistack) -> None:
    box = task("box", ENV_DUMP, Env={"BIND": "0.0.0.0"})
    box.update(Driver="docker", Config={"image": "tool:1", "entrypoint": ["python", "-c"],
                                        "command": ENV_DUMP.strip(), "args": ["x", "y"],
                                        "ports": ["a", "b"]})
    body = job("lc-docker", box)
    body["Job"]["TaskGroups"][0]["Networks"] = [
        {"Mode": "host", "DynamicPorts": [{"Label": "a"}, {"Label": "b"}]}]
    register(stack, body)
    alloc = alloc_when(stack, "lc-docker", lambda a: (adir(stack, a) / "env.json").exists(),
                       "the container's command to run")
    seen = json.loads(wait_for(lambda: (adir(stack, alloc) / "env.json").read_text() or None,
                               what="env.json written"))
    ports = {p["Label"]: p["Value"] for p in alloc["AllocatedResources"]["Shared"]["Ports"]}
    assert set(ports) == {"a", "b"} and ports["a"] != ports["b"]
    assert seen["argv"] == ["x", "y"]
    assert seen["env"]["BIND"] == "127.0.0.1"
    for label, port in ports.items():
        assert seen["env"][f"NOMAD_PORT_{label}"] == str(port)
        assert seen["env"][f"NOMAD_ADDR_{label}"] == f"127.0.0.1:{port}"
        assert seen["env"][f"NOMAD_IP_{label}"] == "127.0.0.1"
    api(stack).job.deregister_job("lc-docker", purge=True)


def test_docker_command_alone_is_the_images_entrypoints_cmd() -> None:
    # the image's ENTRYPOINT stays: `command` only replaces its CMD (as on real docker)
    argv = drivers.docker_argv({"image": "e:1", "command": "python", "args": ["-m", "x"]})
    assert argv == [sys.executable, "-m", "app.refengine", "python", "-m", "x"]
    assert drivers.docker_argv({"image": "e:1"}) == [sys.executable, "-m", "app.refengine"]


def test_fail_tasks_fails_the_named_task_and_task_crash_spares_lifecycle_tasks(
        stack: Hashistack) -> None:
    stack.fault(fail_tasks=["restore"])
    try:
        register(stack, job("lc-ft", task("main", MAIN), task("restore", INIT, "prestart")))
        alloc = alloc_when(stack, "lc-ft", lambda a: a["ClientStatus"] == "failed"
                           and a["TaskStates"]["main"]["State"] == "dead", "the alloc failed")
    finally:
        stack.fault(fail_tasks=[], task_crash=True)
    stderr = (adir(stack, alloc) / "logs" / "restore.stderr.0").read_text()
    assert "fail_tasks fault: task 'restore' fails at start" in stderr
    assert "Started" not in kinds(alloc, "main")
    api(stack).job.deregister_job("lc-ft", purge=True)
    try:
        register(stack, job("lc-crash", task("main", MAIN), task("init", INIT, "prestart")))
        alloc = alloc_when(stack, "lc-crash", lambda a: a["ClientStatus"] == "failed",
                           "the main task crashed")
    finally:
        stack.fault(task_crash=False)
    assert alloc["TaskStates"]["init"]["State"] == "dead"
    assert not alloc["TaskStates"]["init"]["Failed"]
    assert alloc["TaskStates"]["main"]["Failed"]
    assert not (adir(stack, alloc) / "main-ran").exists()   # the crash ran instead
    api(stack).job.deregister_job("lc-crash", purge=True)


# ---- variables by workload identity --------------------------------------------------------

def _reader(path: str) -> dict[str, Any]:
    return task("box", SLEEP, Templates=[{
        "EmbeddedTmpl": f'{{{{ with nomadVar "{path}" }}}}{{{{ .config }}}}{{{{ end }}}}',
        "DestPath": "secrets/c.json", "ChangeMode": "noop"}])


def test_a_task_reads_its_own_variables_and_no_others_when_acls_are_on(
        stack: Hashistack) -> None:
    for path in ("nomad/jobs/lc-wi/g/box", "nomad/jobs/lc-other"):
        put(f"{stack.nomad}/v1/var/{path}", {"Path": path, "Items": {"config": "c-" + path}})
    token = "0b5e7a47-5e3c-4b8d-9d8e-2a6b0f1c9d11"
    stack.acl({token: {"namespace": ["submit-job", "read-job"]}})
    stack.fault(nomad_retry_s=0.5)   # the client's nomad_retry takes 303.75 s
    try:
        for job_id, path in (("lc-wi", "nomad/jobs/lc-wi/g/box"),
                             ("lc-wi2", "nomad/jobs/lc-other")):
            resp = httpx.put(f"{stack.nomad}/v1/job/{job_id}", json=job(job_id, _reader(path)),
                             headers={"X-Nomad-Token": token}, timeout=10, trust_env=False)
            assert resp.status_code == 200, resp.text
        with_token = nomad.Nomad(address=stack.nomad, timeout=5, token=token)

        def state(job_id: str) -> dict[str, Any] | None:
            for stub in with_token.job.get_allocations(job_id):
                if stub["TaskStates"] and stub["TaskStates"]["box"]["State"] != "pending":
                    return dict(stub)
            return None
        mine = wait_for(lambda: state("lc-wi"), what="its own variable rendered")
        other = wait_for(lambda: state("lc-wi2"), what="the other job's variable refused")
    finally:
        stack.acl(None)
        stack.fault(nomad_retry_s=None)
    assert mine["TaskStates"]["box"]["State"] == "running"
    assert (adir(stack, mine).parent / "box" / "secrets" / "c.json").read_text() \
        == "c-nomad/jobs/lc-wi/g/box"
    assert other["ClientStatus"] == "failed"
    events = other["TaskStates"]["box"]["Events"]
    # retried meanwhile as a missing dependency, then the runner's error kills the task
    assert [e["Type"] for e in events] == ["Received", "Task Setup", "Template", "Killing"]
    [killing] = [e for e in events if e["Type"] == "Killing"]
    assert killing["FailsTask"] and "Template failed: nomad.var.block(nomad/jobs/lc-other" \
        in killing["DisplayMessage"] and "403" in killing["DisplayMessage"]
    for job_id in ("lc-wi", "lc-wi2"):
        api(stack).job.deregister_job(job_id, purge=True)


def test_variables_take_empty_values_deep_paths_and_at_most_64_kib(stack: Hashistack) -> None:
    deep = "nomad/jobs/lc-var/engine/snapshot"
    resp = put(f"{stack.nomad}/v1/var/{deep}", {"Path": deep, "Items": {"config": "", "x": "1"}})
    assert resp.status_code == 200, resp.text
    got = httpx.get(f"{stack.nomad}/v1/var/{deep}", timeout=5, trust_env=False).json()
    assert got["Path"] == deep and got["Items"] == {"config": "", "x": "1"}
    big = put(f"{stack.nomad}/v1/var/lc-big", {"Path": "lc-big", "Items": {"k": "v" * 65536}})
    assert big.status_code == 400 and "limited to 64KiB" in big.text
    other = put(f"{stack.nomad}/v1/var/nomad/other", {"Path": "nomad/other", "Items": {"k": "v"}})
    assert other.status_code == 400 and 'only paths at "nomad/jobs"' in other.text
    stack.clear_rejections()
    assert httpx.delete(f"{stack.nomad}/v1/var/{deep}", timeout=5, trust_env=False).status_code == 204


# ---- a node that comes back ----------------------------------------------------------------

def test_a_returning_node_restores_a_volume_the_server_deleted_with_force(
        stack: Hashistack) -> None:
    node = node_id(1)
    gone, kept = create_volume(stack, "lc-gone", node), create_volume(stack, "lc-kept", node)
    stack.node_lost(node)
    try:
        url = f"{stack.nomad}/v1/volume/host/{gone['ID']}"
        refused = httpx.delete(url, timeout=5, trust_env=False)
        assert refused.status_code == 500
        assert refused.text.strip() == ("volume cannot be removed from unknown node without "
                                        "force=true")
        assert httpx.delete(url + "?force=true", timeout=5, trust_env=False).status_code == 200
        assert httpx.get(url, timeout=5, trust_env=False).status_code == 404
    finally:
        stack.node_up(node)
    # the client never got the delete: it restores the volume and fingerprints it, and the
    # server, with no record of it, can neither delete it nor make another of that name there
    assert Path(gone["HostPath"]).is_dir()
    host_volumes = api(stack).node.get_node(node)["HostVolumes"]
    assert host_volumes["lc-gone"]["ID"] == gone["ID"] and "lc-kept" in host_volumes
    assert httpx.get(url, timeout=5, trust_env=False).status_code == 404
    assert "no such volume" in httpx.delete(url, timeout=5, trust_env=False).text
    again = put(f"{stack.nomad}/v1/volume/host/create", {"Volume": {
        "Name": "lc-gone", "PluginID": "mkdir", "NodeID": node, "RequestedCapabilities": [
            {"AccessMode": "single-node-writer", "AttachmentMode": "file-system"}]}})
    assert again.status_code == 500 and "volume name already exists on this node" in again.text
    stack.clear_rejections()
    assert wait_for(lambda: httpx.get(f"{stack.nomad}/v1/volume/host/{kept['ID']}", timeout=5,
                                      trust_env=False).json()["State"] == "ready",
                    what="the kept volume ready again")
