"""The Nomad driver against the Nomad+Consul double (or real agents with NOMAD_REAL=1): what
Consul shows, and each way a scheduler fails, with the status code, the state, and what is left
in Nomad afterwards."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.engines import assert_consistent, nothing_left, proc_state
from tests.harness import Orchestrator, running, wait_for
from tests.scheduler import leftovers, needs_double, service


def _info(url: str, key: str) -> dict:
    return httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {key}"}, timeout=5,
                     trust_env=False).json()


def test_consul_service_names_its_owner_and_its_check_follows_the_engine(nomad_orch: Orchestrator) -> None:
    orch = nomad_orch
    api = orch.client("acme")
    engine = api.post("/engines/provision", json={"user_id": "Alice Smith"}).json()
    name = orch.rows("SELECT name FROM engine")[0][0]
    consul = orch.env["CONSUL_HTTP_ADDR"]
    (entry,) = service(consul, name)
    assert "product-acme" in entry["Service"]["Tags"]
    assert entry["Service"]["Meta"]["user_id"] == "Alice Smith"
    assert entry["Service"]["Meta"]["product"] == "acme"
    # Nomad marks what it registers (command/agent/consul/service_client.go)
    assert entry["Service"]["Meta"]["external-source"] == "nomad"
    assert engine["url"] == f"http://{entry['Service']['Address']}:{entry['Service']['Port']}"
    assert all(c["Status"] == "passing" for c in entry["Checks"])

    # A hung engine (its process stopped, not by us): the check turns critical, and after the
    # grace period the orchestrator marks it failed (unhealthy).
    pid = _info(engine["url"], engine["api_key"])["pid"]
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: any(c["Status"] == "critical" for e in service(consul, name) for c in e["Checks"]),
             timeout=15, what="critical check")
    wait_for(lambda: api.get("/engines/Alice%20Smith").json()["failure_reason"] == "unhealthy",
             timeout=20, what="failed as unhealthy")


def test_killed_engine_is_seen_dead_and_restarted(nomad_orch: Orchestrator) -> None:
    orch = nomad_orch
    api = orch.client("acme")
    engine = api.post("/engines/provision", json={"user_id": "bob"}).json()
    pid = _info(engine["url"], engine["api_key"])["pid"]
    name = orch.rows("SELECT name FROM engine")[0][0]
    os.kill(pid, signal.SIGKILL)
    # Consul stops reporting it passing at once (critical, or gone with its allocation).
    wait_for(lambda: not any(all(c["Status"] == "passing" for c in e["Checks"])
                             for e in service(orch.env["CONSUL_HTTP_ADDR"], name)),
             timeout=15, what="no passing instance")

    def restarted() -> bool:
        got = api.get("/engines/bob").json()
        return got["status"] == "running" and got["restarts"] == 1

    wait_for(restarted, timeout=30, what="restart after the crash")
    url = api.get("/engines/bob").json()["url"]
    assert _info(url, engine["api_key"])["pid"] != pid
    kinds = [e["event"] for e in api.get("/engines/bob/events").json()["events"]]
    assert "fail" in kinds


def test_port_exhaustion_leaves_nothing(tmp_path: Path) -> None:
    with running(tmp_path, "nomad", ports=2) as orch:   # one engine's: http and snapshot
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "first"}).status_code == 200
        before = leftovers(orch.env["NOMAD_ADDR"])
        answer = api.post("/engines/provision", json={"user_id": "second"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "PORT_EXHAUSTION"
        assert [r[0] for r in orch.rows("SELECT user_id FROM engine")] == ["first"]
        assert leftovers(orch.env["NOMAD_ADDR"]) == before  # only the first engine's
        assert api.post("/engines/second/admit", json={"auto_provision": True}).status_code == 503
        assert leftovers(orch.env["NOMAD_ADDR"]) == before


def test_capacity_exhaustion_leaves_nothing(nomad_orch: Orchestrator) -> None:
    needs_double(nomad_orch).fault(memory_exhausted=True)
    api = nomad_orch.client("acme")
    answer = api.post("/engines/provision", json={"user_id": "big"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "CAPACITY_EXHAUSTED"
    assert nomad_orch.rows("SELECT * FROM engine") == []
    assert nothing_left(nomad_orch) == {}
    events = api.get("/engines/big/events").json()["events"]
    assert events[0]["event"] == "provision_failed"


def test_crashing_engine_is_a_boot_timeout_and_keeps_its_brain(tmp_path: Path) -> None:
    with running(tmp_path, "nomad", env={"ORCH_MAX_RESTARTS": "0"}) as orch:
        api = orch.client("acme")
        answer = api.post("/engines/provision", json={"user_id": "crashy",
                                                      "engine_version": "orch-refengine:latest+fault-crash"})
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "BOOT_TIMEOUT"
        got = api.get("/engines/crashy").json()
        assert got["status"] == "failed" and got["failure_reason"] == "crashed" and got["url"] is None
        row = orch.engine_row("crashy")
        brain = Path(json.loads(row["driver_state"])["volume_path"])
        assert brain.is_dir()  # the brain is kept
        allocs = httpx.get(f"{orch.env['NOMAD_ADDR']}/v1/job/{row['name']}/allocations",
                           trust_env=False).json()
        assert allocs and all(a["ClientStatus"] in ("complete", "failed") for a in allocs)
        # destroy removes the job, the volume and the variable
        assert api.delete("/engines/crashy").status_code == 200
        assert nothing_left(orch) == {}
        assert not brain.exists()


def test_consul_down_is_503_and_leaves_nothing(nomad_orch: Orchestrator) -> None:
    stack = needs_double(nomad_orch)
    api = nomad_orch.client("acme")
    stack.fault(consul_down=True)
    answer = api.post("/engines/provision", json={"user_id": "carol"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "SCHEDULER_UNAVAILABLE"
    assert nomad_orch.rows("SELECT * FROM engine") == []
    wait_for(lambda: nothing_left(nomad_orch) == {}, timeout=20, what="clean-up")
    assert api.get("/readyz").status_code == 503
    stack.fault(consul_down=False)
    assert api.post("/engines/provision", json={"user_id": "carol"}).status_code == 200


def test_nomad_down_is_503_and_admit_still_answers(nomad_orch: Orchestrator) -> None:
    stack = needs_double(nomad_orch)
    api = nomad_orch.client("acme")
    running = api.post("/engines/provision", json={"user_id": "dave"}).json()
    pid = _info(running["url"], running["api_key"])["pid"]
    before = leftovers(nomad_orch.env["NOMAD_ADDR"])
    stack.fault(nomad_down=True)
    answer = api.post("/engines/provision", json={"user_id": "erin"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "SCHEDULER_UNAVAILABLE"
    stop = api.post("/engines/dave/stop")
    assert stop.status_code == 503 and stop.json()["error"]["code"] == "SCHEDULER_UNAVAILABLE"
    # The hot path needs only the registry: a running engine is still admitted.
    admitted = api.post("/engines/dave/admit").json()
    assert admitted["admitted"] and admitted["url"] == running["url"]
    assert [r[0] for r in nomad_orch.rows("SELECT user_id FROM engine")] == ["dave"]
    stack.fault(nomad_down=False)
    assert leftovers(nomad_orch.env["NOMAD_ADDR"]) == before
    wait_for(lambda: api.post("/engines/dave/stop").status_code == 200, timeout=30,
             what="stop once Nomad is back")
    assert proc_state(pid) == "gone"


def test_node_lost_fails_the_engine_until_its_node_returns(tmp_path: Path) -> None:
    with running(tmp_path, "nomad", env={"ORCH_MAX_RESTARTS": "1", "ORCH_NODE_LOST_RESTORE_S": "0"}) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        engine = api.post("/engines/provision", json={"user_id": "frank"}).json()
        bearer = {"Authorization": f"Bearer {engine['api_key']}"}
        assert httpx.put(engine["url"] + "/v1/memory/k", content=b"v", headers=bearer,
                         trust_env=False).status_code in (200, 201, 204)
        node = json.loads(orch.engine_row("frank")["driver_state"])["node"]
        stack.node_lost(node)

        def failed_node_lost() -> bool:
            got = api.get("/engines/frank").json()
            return got["status"] == "failed" and got["failure_reason"] == "node_lost"
        wait_for(failed_node_lost, timeout=30, what="failed (node_lost)")
        first_due = orch.engine_row("frank")["next_restart_at"]
        # Its restart came due and found the node still down: put off, no restart spent.
        wait_for(lambda: orch.engine_row("frank")["next_restart_at"] != first_due, timeout=30,
                 what="the restart put off while the node is down")
        assert orch.engine_row("frank")["restarts"] == 0
        assert orch.engine_row("frank")["status"] == "failed"
        # Its brain is on that node: a start cannot place it, and says so.
        answer = api.post("/engines/frank/start")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "CAPACITY_EXHAUSTED"
        assert "node" in answer.json()["error"]["message"]
        assert api.get("/engines/frank").json()["failure_reason"] == "node_lost"
        stack.node_up(node)
        started = api.post("/engines/frank/start")
        # The start brings it back; or, first, the allocation Nomad replaces once the node is
        # back (the event stream reports it, and the reconciler takes it up) has.
        came_back = started.status_code == 409 and \
            started.json()["error"]["code"] == "ENGINE_ALREADY_RUNNING"
        assert started.status_code == 200 or came_back, started.text
        url = started.json()["url"] if started.status_code == 200 else \
            api.get("/engines/frank").json()["url"]
        got = httpx.get(url + "/v1/memory/k", headers=bearer, trust_env=False)
        assert got.content == b"v"   # the same brain, back with its node
        assert_consistent(orch)


def test_a_destroy_while_the_brains_node_is_down_finishes_when_it_returns(tmp_path: Path) -> None:
    """Nomad would only forget a volume deleted with force=true while its node is down, and the
    node would bring it back with the user's data: the destroy waits for the node instead."""
    with running(tmp_path, "nomad", env={"ORCH_LEASE_S": "2"}) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "gus"}).status_code == 200
        node = json.loads(orch.engine_row("gus")["driver_state"])["node"]
        stack.node_lost(node)
        answer = api.delete("/engines/gus")
        assert answer.status_code == 503, answer.text
        assert "node" in answer.json()["error"]["message"]
        assert api.get("/engines/gus").json()["status"] == "destroying"
        assert len(leftovers(orch.env["NOMAD_ADDR"])["volumes"]) == 1
        stack.node_up(node)
        wait_for(lambda: api.get("/engines/gus").status_code == 404, timeout=60,
                 what="the destroy finished once the node is back")
        assert leftovers(orch.env["NOMAD_ADDR"]) == {"jobs": [], "volumes": [], "variables": []}
        assert [v["node"] for v in stack.state()["volumes"]] == []


def test_docker_template_on_three_nodes_as_real_nomad_runs_it(tmp_path: Path) -> None:
    """Rows 1-4, 6, 10 and 15 end to end: a non-root image writes its brain and reads its
    key, the image has a real tag, volumes spread over the nodes, a rotation is confirmed
    with Nomad's template timing, and product strings reach Nomad uninterpolatable."""
    with running(tmp_path, "nomad") as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        users = ["u${node.unique.name}", "b", "c"]
        engines = [api.post("/engines/provision", json={"user_id": u}) for u in users]
        assert [e.status_code for e in engines] == [200, 200, 200], engines[0].text
        nodes = {v["node"] for v in stack.state()["volumes"]}
        assert len(nodes) == 3   # the fewest engine volumes: one per node
        name = orch.rows("SELECT name FROM engine WHERE user_id = ?", users[0])[0][0]
        job = httpx.get(f"{orch.env['NOMAD_ADDR']}/v1/job/{name}", trust_env=False).json()
        task = job["TaskGroups"][0]["Tasks"][0]
        assert task["Config"]["image"] == "orch-refengine:0.1.0"
        assert task["Env"]["ENGINE_USER_ID"] == "u%24{node.unique.name}"
        assert "${node" not in json.dumps(job["Meta"]) + json.dumps(job["TaskGroups"][0]["Services"])
        assert task["Templates"][0]["Uid"] == 65534 and task["Templates"][0]["Splay"] == 0
        # and the engine got it unexpanded (the double interpolates ${node.unique.name} as
        # Nomad's client does)
        [pid] = [a["pids"]["engine"] for a in stack.state()["allocs"] if a["job"] == name]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"ENGINE_USER_ID=u%24{node.unique.name}" in environ
        # rotation: confirmed with the template's own Wait and no splay (the double would wait
        # 5-10 s with Nomad's defaults, past the 10 s confirm window)
        rotated = api.post(f"/engines/{users[1]}/rotate-key")
        assert rotated.status_code == 200, rotated.text
        # engine_version: a tag of ORCH_ENGINE_IMAGE's repository, or a listed repository
        for bad in ("evil.example/miner:1", "orch-refengine:latest", "v${attr.x}"):
            refused = api.post("/engines/provision", json={"user_id": "d", "engine_version": bad})
            assert refused.status_code == 400, bad
        assert_consistent(orch)   # reads the job list with meta=true


@pytest.mark.parametrize("jobspec", ["engine.raw_exec.json"])
def test_raw_exec_template_runs_the_reference_engine(tmp_path: Path, jobspec: str) -> None:
    from tests.harness import ROOT

    spec = str(ROOT / "jobspecs" / jobspec)
    with running(tmp_path, "nomad", env={"ORCH_NOMAD_JOBSPEC": spec}) as orch:
        api = orch.client("acme")
        engine = api.post("/engines/provision", json={"user_id": "gina"})
        assert engine.status_code == 200, engine.text
        engine = engine.json()
        put = httpx.put(engine["url"] + "/v1/memory/k", content=b"v", trust_env=False,
                        headers={"Authorization": f"Bearer {engine['api_key']}"})
        assert put.status_code in (200, 201, 204)
        row = orch.engine_row("gina")
        assert (Path(json.loads(row["driver_state"])["volume_path"])).is_dir()
        assert api.delete("/engines/gina").status_code == 200
        assert nothing_left(orch) == {}


def test_reconciler_checks_the_fleet_without_a_read_per_engine(nomad_orch: Orchestrator) -> None:
    """With the event stream and Consul's blocking query live, a healthy engine's
    scheduled check is answered from them: no read of its own, and no fleet listing per pass
    either (only the resync's audit lists the allocations, once per ORCH_RESYNC_S, 2 s here;
    before, every pass listed them). Without events, tests/unit/test_nomad_events.py."""
    stack = needs_double(nomad_orch)
    api = nomad_orch.client("acme")
    for user in ("p1", "p2", "p3"):
        assert api.post("/engines/provision", json={"user_id": user}).status_code == 200

    def counts() -> dict[tuple[str, str], int]:
        return {(r["api"], r["route"]): r["count"] for r in stack.requests() if r["method"] == "GET"}

    def probes() -> float:
        metrics = httpx.get(nomad_orch.url + "/metrics", trust_env=False).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("orch_driver_call_seconds_count{") and 'call="probe"' in line)

    wait_for(lambda: probes() >= 3, timeout=20, what="each engine checked")   # all watched now
    before, checked, started = counts(), probes(), time.monotonic()
    wait_for(lambda: probes() >= checked + 15, timeout=20, what="five checks of each engine")
    after, elapsed = counts(), time.monotonic() - started
    per_engine = [("nomad", "/v1/allocation/{alloc_id}"), ("consul", "/v1/health/service/{name}")]
    assert {k: after.get(k, 0) - before.get(k, 0) for k in per_engine} == {k: 0 for k in per_engine}
    listings = after.get(("nomad", "/v1/allocations"), 0) - before.get(("nomad", "/v1/allocations"), 0)
    resync_s = float(nomad_orch.env["ORCH_RESYNC_S"])
    assert listings <= elapsed / resync_s + 2   # the resync's audits meanwhile, no more


def test_slow_health_is_a_boot_timeout_with_the_task_stopped(tmp_path: Path) -> None:
    env = {"ORCH_BOOT_TIMEOUT_S": "2", "ORCH_MAX_RESTARTS": "0"}
    with running(tmp_path, "nomad", env=env) as orch:
        needs_double(orch).fault(slow_health_s=30)
        api = orch.client("acme")
        answer = api.post("/engines/provision", json={"user_id": "slow"})
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "BOOT_TIMEOUT"
        got = api.get("/engines/slow").json()
        assert got["status"] == "failed" and got["failure_reason"] == "boot_timeout"
        row = orch.engine_row("slow")
        allocs = httpx.get(f"{orch.env['NOMAD_ADDR']}/v1/job/{row['name']}/allocations",
                           trust_env=False).json()
        assert allocs and all(a["ClientStatus"] in ("complete", "failed") for a in allocs)
        assert Path(json.loads(row["driver_state"])["volume_path"]).is_dir()
