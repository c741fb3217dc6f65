"""The double as a production Nomad v1.10.5 cluster runs: a client's node-update timing, the
scheduler's asynchronous evaluations, ACL host_volume rules, node resources, the client's
max_kill_timeout, and the smaller answers of the HTTP layer. One production-timing double
(`python -m tests.doubles` with no flag), three nodes."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.doubles.fixture import ROOT, Hashistack, served
from tests.doubles.state import node_id
from tests.harness import free_port_range, wait_for
from tests.unit.test_double import job_named, put

pytestmark = pytest.mark.timeout(120)
SECOND = 1_000_000_000
NODES = [node_id(i) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    with served(tmp_path_factory.mktemp("timing"), free_port_range(10), nodes=3) as hs:
        yield hs


def sleeper(job_id: str, kill_timeout_ns: int = 2 * SECOND) -> dict[str, Any]:
    """A raw_exec job with no volume: placed at once, stopped by its KillSignal."""
    return {"Job": {"ID": job_id, "Name": job_id, "Type": "service", "Datacenters": ["*"],
                    "TaskGroups": [{"Name": "g", "Count": 1, "Tasks": [{
                        "Name": "t", "Driver": "raw_exec",
                        "Config": {"command": "/bin/sleep", "args": ["60"]},
                        "KillTimeout": kill_timeout_ns, "KillSignal": "SIGTERM",
                        "Resources": {"CPU": 100, "MemoryMB": 64}}]}]}}


def get(stack: Hashistack, path: str, **params: Any) -> Any:
    response = httpx.get(stack.nomad + path, params=params, timeout=10, trust_env=False)
    response.raise_for_status()
    return response.json()


def volume_spec(name: str, node: str) -> dict[str, Any]:
    return {"Volume": {"Name": name, "PluginID": "mkdir", "NodeID": node,
                       "RequestedCapabilities": [{"AccessMode": "single-node-writer",
                                                  "AttachmentMode": "file-system"}]}}


def purge(stack: Hashistack, job_id: str) -> None:
    httpx.delete(f"{stack.nomad}/v1/job/{job_id}", params={"purge": "true"}, trust_env=False)


# ---- timing: node updates, evaluations ------------------------------------------------------

def test_a_new_volume_is_pending_until_the_clients_batched_node_update(stack: Hashistack) -> None:
    """client/client.go watchNodeUpdates: 5 s + a stagger up to 5 s after the first change;
    a second volume on the node rides on the same update."""
    first = put(f"{stack.nomad}/v1/volume/host/create", volume_spec("tv-a", NODES[2])).json()
    second = put(f"{stack.nomad}/v1/volume/host/create", volume_spec("tv-b", NODES[2])).json()
    assert first["Volume"]["State"] == second["Volume"]["State"] == "pending"
    time.sleep(4.5)
    assert get(stack, f"/v1/volume/host/{first['Volume']['ID']}")["State"] == "pending"

    def both_ready() -> list[dict[str, Any]] | None:
        found = [get(stack, f"/v1/volume/host/{x['Volume']['ID']}") for x in (first, second)]
        return found if all(v["State"] == "ready" for v in found) else None
    volumes = wait_for(both_ready, timeout=15, interval=0.1, what="the node update")
    assert volumes[0]["ModifyIndex"] == volumes[1]["ModifyIndex"]   # one node update for both
    assert volumes[0]["ModifyTime"] - volumes[0]["CreateTime"] >= 5 * SECOND
    stub = next(n for n in get(stack, "/v1/nodes") if n["ID"] == NODES[2])
    assert set(stub["HostVolumes"]) >= {"tv-a", "tv-b"}   # the stub carries the node's volumes
    for vol in volumes:
        httpx.delete(f"{stack.nomad}/v1/volume/host/{vol['ID']}", trust_env=False)


def test_register_answers_before_its_evaluation_is_processed(stack: Hashistack) -> None:
    """nomad/job_endpoint.go Register commits the eval; a scheduler worker dequeues it later."""
    answer = put(f"{stack.nomad}/v1/job/e-async-0123456789ab", sleeper("e-async-0123456789ab"))
    assert answer.status_code == 200, answer.text
    try:
        # processed after the answer: the eval changed at an index past the reply's
        evaluation = wait_for(lambda: (lambda e: e if e["Status"] == "complete" else None)(
            get(stack, f"/v1/evaluation/{answer.json()['EvalID']}")), what="the eval processed")
        assert evaluation["CreateIndex"] == answer.json()["EvalCreateIndex"]
        assert evaluation["ModifyIndex"] > answer.json()["Index"]
    finally:
        purge(stack, "e-async-0123456789ab")


# ---- ACLs: host_volume rules ----------------------------------------------------------------

def test_register_checks_the_host_volume_rule_of_each_mounted_volume(stack: Hashistack) -> None:
    job = job_named("e-acl-0123456789ab")
    base = {"namespace": ["submit-job", "read-job"]}
    stack.acl({"none": base,
               "ro": {**base, "host_volume": {"e-*": ["mount-readonly"]}},
               "rw": {**base, "host_volume": {"e-acl-*": ["mount-readwrite"]}},
               "deny": {**base, "host_volume": {"e-*": ["mount-readwrite"],
                                                "e-acl-0123456789ab": ["deny"]}}})
    try:
        def register(token: str, body: dict[str, Any]) -> int:
            return httpx.put(f"{stack.nomad}/v1/job/e-acl-0123456789ab", json=body,
                             headers={"X-Nomad-Token": token}, trust_env=False).status_code
        assert register("none", job) == 403
        assert register("ro", job) == 403      # read-write needs mount-readwrite
        assert register("deny", job) == 403   # the exact name wins over the glob
        readonly = copy.deepcopy(job)
        readonly["Job"]["TaskGroups"][0]["Volumes"]["brain"]["ReadOnly"] = True
        assert register("ro", readonly) == 200
        assert register("rw", job) == 200
    finally:
        stack.acl(None)
        purge(stack, "e-acl-0123456789ab")


# ---- nodes with resources -------------------------------------------------------------------

def test_a_full_node_fails_placement_per_dimension(stack: Hashistack) -> None:
    stack.node_resources(cpu=150, memory_mb=8192, node_class="small")   # one 100 MHz task each
    jobs = [f"e-full{i}-0123456789ab" for i in range(4)]
    try:
        evals = [put(f"{stack.nomad}/v1/job/{j}", sleeper(j)).json()["EvalID"] for j in jobs]
        done = [wait_for(lambda e=e: (lambda x: x if x["Status"] == "complete" else None)(
            get(stack, f"/v1/evaluation/{e}")), what="evals") for e in evals]
        placed = [get(stack, f"/v1/job/{j}/allocations") for j in jobs[:3]]
        assert sorted(a[0]["NodeID"] for a in placed) == NODES   # one per node
        failed = done[3]["FailedTGAllocs"]["g"]
        assert failed["DimensionExhausted"] == {"cpu": 3} and failed["NodesExhausted"] == 3
        assert failed["ClassExhausted"] == {"small": 3}
        assert done[3]["BlockedEval"]
        stub = get(stack, "/v1/nodes", resources="true")[0]
        assert stub["NodeResources"]["Cpu"]["CpuShares"] == 150
        assert get(stack, "/v1/nodes")[0]["NodeResources"] is None   # only when asked
        # An allocation that finishes frees its room: the blocked eval runs again and places.
        assert get(stack, f"/v1/job/{jobs[3]}/allocations") == []
        purge(stack, jobs[0])
        wait_for(lambda: [a for a in get(stack, f"/v1/job/{jobs[3]}/allocations")
                          if a["ClientStatus"] == "running"], what="the blocked job placed")
    finally:
        for j in jobs:
            purge(stack, j)
        stack.node_resources(cpu=4000, memory_mb=8192, node_class="")


def test_a_draining_node_is_drain_in_its_stub(stack: Hashistack) -> None:
    stack.node_drain(NODES[1])
    try:
        stub = next(n for n in get(stack, "/v1/nodes") if n["ID"] == NODES[1])
        assert stub["Drain"] is True and stub["SchedulingEligibility"] == "ineligible"
    finally:
        stack.node_drain(NODES[1], enable=False)
    assert not any(n["Drain"] for n in get(stack, "/v1/nodes"))


# ---- the kill timeout -----------------------------------------------------------------------

def test_a_kill_timeout_above_the_clients_max_is_cut_and_above_the_deadline_refused(
        stack: Hashistack) -> None:
    long_grace = sleeper("e-kill-0123456789ab", kill_timeout_ns=45 * SECOND)
    assert put(f"{stack.nomad}/v1/job/e-kill-0123456789ab", long_grace).status_code == 200
    try:
        alloc = wait_for(lambda: [a for a in get(stack, "/v1/job/e-kill-0123456789ab/allocations")
                                  if a["ClientStatus"] == "running"], what="running")[0]
        httpx.delete(f"{stack.nomad}/v1/job/e-kill-0123456789ab", trust_env=False)
        events = wait_for(lambda: [e for e in get(stack, f"/v1/allocation/{alloc['ID']}")
                                   ["TaskStates"]["t"]["Events"] if e["Type"] == "Killing"],
                          what="the kill")
        assert events[0]["KillTimeout"] == 30 * SECOND   # the client's max_kill_timeout
    finally:
        purge(stack, "e-kill-0123456789ab")
    too_long = sleeper("e-kill2-0123456789ab", kill_timeout_ns=660 * SECOND)
    answer = put(f"{stack.nomad}/v1/job/e-kill2-0123456789ab", too_long)
    assert answer.status_code == 500
    assert "KillTimout (11m0s) longer than the group's ProgressDeadline (10m0s)" in answer.text


# ---- the HTTP layer's smaller answers -------------------------------------------------------

def test_allocations_of_an_earlier_job_with_the_same_id_only_with_all(stack: Hashistack) -> None:
    jid = "e-again-0123456789ab"
    put(f"{stack.nomad}/v1/job/{jid}", sleeper(jid))
    first = wait_for(lambda: get(stack, f"/v1/job/{jid}/allocations"), what="placed")
    purge(stack, jid)
    put(f"{stack.nomad}/v1/job/{jid}", sleeper(jid))
    try:
        second = wait_for(lambda: get(stack, f"/v1/job/{jid}/allocations"), what="placed")
        assert [a["ID"] for a in second] != [a["ID"] for a in first]
        assert first[0]["ID"] not in {a["ID"] for a in second}
        every = {a["ID"] for a in get(stack, f"/v1/job/{jid}/allocations", all="true")}
        assert first[0]["ID"] in every and second[0]["ID"] in every
    finally:
        purge(stack, jid)


def test_a_job_without_id_and_a_purge_that_is_no_bool(stack: Hashistack) -> None:
    body = sleeper("e-noid-0123456789ab")
    del body["Job"]["ID"]
    answer = put(f"{stack.nomad}/v1/jobs", body)
    assert (answer.status_code, answer.text) == (400, "Job ID hasn't been provided")
    answer = httpx.delete(f"{stack.nomad}/v1/job/e-noid-0123456789ab", params={"purge": "maybe"},
                          trust_env=False)
    assert answer.status_code == 500
    assert answer.text.startswith('Failed to parse value of "purge" (maybe) as a bool')


def test_a_check_needs_interval_and_timeout_as_nomad_says(stack: Hashistack) -> None:
    body = job_named("e-check-0123456789ab")
    check = body["Job"]["TaskGroups"][0]["Services"][0]["Checks"][0]
    del check["Interval"]
    check["Timeout"] = 500_000_000
    answer = put(f"{stack.nomad}/v1/job/e-check-0123456789ab", body)
    assert answer.status_code == 500
    assert "missing required value interval. Interval cannot be less than 1s" in answer.text
    assert "timeout (500ms) is lower than required minimum timeout 1s" in answer.text


def test_a_variable_is_written_at_the_urls_path(stack: Hashistack) -> None:
    """command/agent/variable_endpoint.go variableUpsert sets the body's Path from the URL."""
    answer = put(f"{stack.nomad}/v1/var/nomad/jobs/e-url-0123456789ab",
                 {"Path": "nomad/jobs/elsewhere", "Items": {"k": "v"}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["Path"] == "nomad/jobs/e-url-0123456789ab"
    assert get(stack, "/v1/var/nomad/jobs/e-url-0123456789ab")["Items"] == {"k": "v"}
    httpx.delete(f"{stack.nomad}/v1/var/nomad/jobs/e-url-0123456789ab", trust_env=False)


def test_the_double_serves_production_timing_unless_told_dev() -> None:
    from tests.doubles.__main__ import parse_args
    assert not parse_args(["--data-dir", "x"]).dev
    assert parse_args(["--data-dir", "x", "--dev"]).dev
    help_text = subprocess.run([sys.executable, "-m", "tests.doubles", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout
    assert "--dev" in help_text and "--node-cpu" in help_text
