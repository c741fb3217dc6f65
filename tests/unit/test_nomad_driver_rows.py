"""Sides of the driver the other tests leave loose.

Nomad's job stubs carry `Meta` only with `?meta=true` (command/agent/job_endpoint.go),
so a driver that lists jobs without it never recognises its own. The other tests did not
notice: an engine's volume and variable carry its name too. Here a job is all that is left (its
volume and variable already gone, as a crash mid-destroy leaves it), and the orphan sweep must
still find it.

The ACL policy nomad/README.md gives (parsed from it, not copied) covers an engine's
whole life; a capability dropped from it fails the life, naming what is missing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import jobspec
from app.config import Settings
from app.drivers._nomad_api import PermissionDenied
from app.drivers.base import EngineSpec
from app.drivers.nomad import NomadDriver
from tests.doubles.fixture import Hashistack, served
from tests.harness import ROOT, free_port_range

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("rows"), free_port_range(10), nodes=1,
               dev=True) as hs:
        yield hs


def nomad_settings(stack: Hashistack, **more: Any) -> Settings:
    """The Nomad driver's settings against the double, with the docker template."""
    return Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul,
                    nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json", **more)

def test_a_job_left_alone_is_listed_as_ours_and_a_foreign_one_is_not(stack: Hashistack) -> None:
    settings = nomad_settings(stack)
    ours = EngineSpec("e-acme-lone-0123456789ab", "acme", "lone", "0.1.0")
    foreign = EngineSpec("e-other-job-0123456789ab", "acme", "x", "0.1.0")

    async def work() -> set[str]:
        driver = NomadDriver(settings)
        try:
            # a job with no volume and no variable: it waits, blocked, and is still ours
            await driver._io(driver.api.register, jobspec.render_job(settings, ours))
            stranger = jobspec.render_job(settings, foreign)
            stranger["Meta"] = {**stranger["Meta"], "managed_by": "someone-else"}
            await driver._io(driver.api.register, stranger)
            assert not [v for v in await driver._io(driver.api.volumes)
                        if v["Name"] in (ours.name, foreign.name)]
            return await driver.list_names()
        finally:
            for spec in (ours, foreign):
                await driver._io(driver.api.deregister, spec.name, True)
            await driver.close()

    names = asyncio.run(work())
    assert ours.name in names and foreign.name not in names
    assert httpx.get(f"{stack.nomad}/v1/jobs", params={"prefix": "e-"},
                     trust_env=False).json() == []


# ---- the policy nomad/README.md gives is the one tested ------- ------------------------------

def readme_policy() -> dict[str, object]:
    """nomad/README.md's HCL policy, as the double's ACL table takes it."""
    text = (ROOT / "nomad" / "README.md").read_text()
    hcl = text.split("## ACL policy", 1)[1].split("```hcl", 1)[1].split("```", 1)[0]
    hcl = "\n".join(line.split("#", 1)[0] for line in hcl.splitlines())   # comments out
    namespace = re.findall(r'"([a-z-]+)"', hcl.split("capabilities = [", 1)[1].split("]", 1)[0])
    [(path, caps)] = re.findall(r'path "([^"]+)" \{\s*capabilities = \[([^\]]*)\]', hcl)
    [node] = re.findall(r'node \{\s*policy = "([a-z]+)"', hcl)
    [(volume, volume_caps)] = re.findall(
        r'host_volume "([^"]+)" \{\s*capabilities = \[([^\]]*)\]', hcl)
    return {"namespace": namespace, "variables": {path: re.findall(r'"([a-z]+)"', caps)},
            "node": node, "host_volume": {volume: re.findall(r'"([a-z-]+)"', volume_caps)}}


def test_the_readme_policy_covers_an_engines_whole_life(stack: Hashistack) -> None:
    policy = readme_policy()
    assert "list-jobs" in policy["namespace"] and policy["node"] == "read"   # parsed, not empty
    assert policy["host_volume"] == {"e-*": ["mount-readwrite"]}
    settings = nomad_settings(stack, nomad_token="orch", stop_grace_s=2.0)
    spec = EngineSpec("e-acme-policy-0123456789ab", "acme", "policy", "0.1.0")
    stack.acl({"orch": policy})
    try:
        async def life() -> None:
            driver = NomadDriver(settings)   # start-up's validate call included
            try:
                state = await driver.create(spec, "k1")
                state, _ = await driver.wait_ready(spec, state, 20)
                await driver.set_key(spec, state, "k2")
                await driver.pause(spec, state)
                assert await driver.resume(spec, state)
                assert spec.name in await driver.list_names()
                await driver.destroy(spec, state)
            finally:
                await driver.close()
        asyncio.run(life())
    finally:
        stack.acl(None)
    left = stack.state()
    assert not [v for v in left["volumes"] if v["name"] == spec.name]
    assert not [a for a in left["allocs"] if a["job"] == spec.name and a["client_status"] == "running"]
    assert httpx.get(f"{stack.nomad}/v1/var/nomad/jobs/{spec.name}", trust_env=False).status_code == 404


def test_without_the_host_volume_rule_a_provision_names_it(stack: Hashistack) -> None:
    """Job.Register checks the mounted host volume's `mount-readwrite` after submit-job
    (nomad/job_endpoint.go Register): the 403 must name the rule, not only submit-job."""
    policy = {k: v for k, v in readme_policy().items() if k != "host_volume"}
    settings = nomad_settings(stack, nomad_token="orch", stop_grace_s=2.0)
    spec = EngineSpec("e-acme-novol-0123456789ab", "acme", "novol", "0.1.0")
    stack.acl({"orch": policy})
    try:
        async def provision() -> str:
            driver = NomadDriver(settings)
            try:
                with pytest.raises(PermissionDenied) as info:
                    await driver.create(spec, "k1")
                return str(info.value)
            finally:
                await driver.close()
        message = asyncio.run(provision())
    finally:
        stack.acl(None)
    assert "403 Permission denied" in message
    assert f'host_volume "{spec.name}" capability mount-readwrite' in message
    left = stack.state()   # everything the failed provision made is taken back
    assert not [v for v in left["volumes"] if v["name"] == spec.name]
    assert spec.name not in left["jobs"]


# ---- the double's side: what the driver must escape ------- is really expanded --------------

def test_the_double_expands_node_variables_in_env_as_nomad_does(stack: Hashistack) -> None:
    """helper/args/args.go: `${node.unique.name}` in a task's Env is replaced at run time, with
    no escape. Without this, the driver's escaping (tests/unit/test_jobspec.py) and the end to
    end check that an engine gets its user id unexpanded would prove nothing."""
    from tests.unit.test_double_cluster import one, purge, start

    job = "e-row15-0123456789ab"
    start(stack, job, lambda task: task["Env"].update(ENGINE_USER_ID="u${node.unique.name}"))
    try:
        alloc = one(stack, job, "running")
        [pid] = [p for a in stack.state()["allocs"] if a["id"] == alloc["ID"]
                 for p in a["pids"].values()]
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        node = httpx.get(f"{stack.nomad}/v1/node/{alloc['NodeID']}", trust_env=False).json()
        assert environ["ENGINE_USER_ID"] == "u" + node["Name"]
    finally:
        purge(stack, job)


# ---- the driver's side of stop ------- (destroy's is in test_nomad_driver.py) ---------------

def test_stop_thaws_a_paused_engine_so_it_exits_on_sigterm(stack: Hashistack) -> None:
    """Nomad sends only the KillSignal, then SIGKILL after the KillTimeout: an engine paused
    by sleep (SIGSTOP) and then stopped must get SIGCONT first, or it dies by SIGKILL."""
    settings = nomad_settings(stack, stop_grace_s=2.0)
    spec = EngineSpec("e-acme-nap-0123456789ab", "acme", "nap", "0.1.0")

    async def work() -> list[dict[str, object]]:
        driver = NomadDriver(settings)
        try:
            state = await driver.create(spec, "k1")
            state, _ = await driver.wait_ready(spec, state, 20)
            await driver.pause(spec, state)
            await driver.stop(spec, state, settings.stop_grace_s)
            alloc = await driver._io(driver.api.allocation, state["alloc"])
            await driver.destroy(spec, state)
            return [e for e in alloc["TaskStates"]["engine"]["Events"] if e["Type"] == "Terminated"]
        finally:
            await driver.close()

    terminated = asyncio.run(work())
    assert terminated and terminated[-1]["Signal"] == 0   # a clean exit on SIGTERM


# ---- a down node is never asked ------- ------------------------------------------------------

def test_a_down_node_is_never_asked_for_a_volume(tmp_path: Path) -> None:
    """The node the driver picks is ready: not one whose create fails and is retried elsewhere
    (which the end result alone, a volume on a live node, would not tell apart)."""
    from tests.doubles.state import node_id

    with served(tmp_path, free_port_range(10), nodes=3, dev=True) as stack:   # no waits here
        settings = nomad_settings(stack)
        stack.node_lost(node_id(1))   # the first in ID order, where Nomad itself would go

        async def work() -> dict[str, Any]:
            driver = NomadDriver(settings)
            try:
                spec = EngineSpec("e-acme-down-0123456789ab", "acme", "down", "0.1.0")
                job = jobspec.render_job(settings, spec)
                volume, _ = await driver._io(driver.volumes.create, spec.name, job)
                await driver.destroy(spec, None)
                return volume
            finally:
                await driver.close()

        volume = asyncio.run(work())
        assert volume["NodeID"] != node_id(1)
        creates = [r["count"] for r in stack.requests()
                   if (r["method"], r["route"]) == ("PUT", "/v1/volume/host/create")]
        assert creates == [1]   # one create, on a live node: none sent to the down one
        stack.node_up(node_id(1))
