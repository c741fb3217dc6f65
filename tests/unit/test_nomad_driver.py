"""The Nomad driver, in process, against a 3-node double: the parts the
orchestrator-level tests do not reach (ACLs, superseded evals, Nomad's validator, idempotent
volume create/delete, the node choice, SIGCONT before destroy)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import jobspec
from app.config import ConfigError, Settings
from app.drivers.base import EngineSpec, SchedulerUnavailable
from app.drivers.nomad import NomadDriver
from app.errors import EngineCrashed
from tests.doubles.fixture import Hashistack, served
from tests.doubles.state import node_id
from tests.harness import ROOT, free_port_range, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("driver"), free_port_range(20), nodes=3,
               dev=True) as hs:
        yield hs


def settings(stack: Hashistack, **extra: Any) -> Settings:
    values: dict[str, Any] = {"nomad_jobspec": ROOT / "jobspecs" / "engine.docker.json",
                              "stop_grace_s": 2.0, **extra}
    return Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul, **values)


def spec(user: str) -> EngineSpec:
    return EngineSpec(f"e-acme-{user}-0123456789ab", "acme", user, "0.1.0")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_driver(stack: Hashistack, work: Any, **extra: Any) -> Any:
    driver = NomadDriver(settings(stack, **extra))
    try:
        return await work(driver)
    finally:
        await driver.close()


def test_volumes_go_to_the_least_loaded_ready_node_and_create_is_idempotent(
        stack: Hashistack) -> None:
    async def work(driver: NomadDriver) -> list[str]:
        nodes = []
        for user in ("v1", "v2", "v3"):
            job = jobspec.render_job(driver.settings, spec(user))
            volume, new = await driver._io(driver.volumes.create, spec(user).name, job)
            nodes.append(volume["NodeID"])
            again, new_again = await driver._io(driver.volumes.create, spec(user).name, job)
            assert new and not new_again
            assert again["ID"] == volume["ID"]   # looked up by name, not made twice
            assert again["HostPath"]             # read whole: a list stub has none
            assert volume["Parameters"] == {"uid": "65534", "gid": "65534", "mode": "0700"}
        stack.node_lost(node_id(1))
        try:
            job = jobspec.render_job(driver.settings, spec("v4"))
            fourth, _ = await driver._io(driver.volumes.create, spec("v4").name, job)
            assert fourth["NodeID"] != node_id(1)   # never a down node
        finally:
            stack.node_up(node_id(1))
        for user in ("v1", "v2", "v3", "v4"):
            await driver.destroy(spec(user), None)
            await driver.destroy(spec(user), None)   # again: nothing there, no error
        return nodes
    assert sorted(run(_with_driver(stack, work))) == [node_id(i) for i in (1, 2, 3)]
    assert not [v for v in stack.state()["volumes"] if v["name"].startswith("e-acme-v")]


def test_delete_of_a_volume_already_gone_is_done(stack: Hashistack) -> None:
    async def work(driver: NomadDriver) -> None:
        await driver._delete_volume("no-such-volume")   # Nomad: 500 "no such volume"
    run(_with_driver(stack, work))


def test_a_canceled_eval_is_followed_to_the_one_that_superseded_it(stack: Hashistack) -> None:
    async def work(driver: NomadDriver) -> None:
        s = spec("ev")
        state = await driver.create(s, "k1")   # volume, variable, job
        job = jobspec.render_job(driver.settings, s, volume_path=state.get("volume_path"))
        stack.fault(eval_delay_s=0.3)
        try:
            first = await driver._io(driver.api.register, {**job, "Meta": {**job["Meta"], "x": "1"}})
            ours = await driver._io(driver.api.register, {**job, "Meta": {**job["Meta"], "x": "2"}})
            await driver._io(driver.api.register, {**job, "Meta": {**job["Meta"], "x": "3"}})
            alloc = await driver._placed(s, ours)
        finally:
            stack.fault(eval_delay_s=0)
        assert (await driver._io(driver.api.evaluation, ours))["Status"] == "canceled"
        assert (await driver._io(driver.api.evaluation, first))["Status"] == "complete"
        assert (await driver._io(driver.api.allocation, alloc))["DesiredStatus"] == "run"
        await driver.destroy(s, state)
    run(_with_driver(stack, work))


def test_an_engine_that_crashed_before_the_driver_looked_is_a_crash_not_a_wait(
        stack: Hashistack) -> None:
    # On a loaded host the allocation can fail before the driver first reads the allocations:
    # the driver used to look only for live ones and waited out PLACEMENT_WAIT_S (30 s).
    async def work(driver: NomadDriver) -> None:
        s = spec("early")
        state = await driver.create(s, "k1")
        crashing = EngineSpec(s.name, s.product, s.user_id, "0.1.0+fault-crash")
        job = jobspec.render_job(driver.settings, crashing, volume_path=state.get("volume_path"))
        eval_id = await driver._io(driver.api.register, job)
        wait_for(lambda: any(a["EvalID"] == eval_id and a["ClientStatus"] == "failed"
                             for a in stack_allocations(stack, s.name)), what="the allocation failed")
        alloc = await asyncio.wait_for(driver._placed(crashing, eval_id), timeout=10)
        assert (await driver._io(driver.api.allocation, alloc))["ClientStatus"] == "failed"
        with pytest.raises(EngineCrashed):
            await driver.wait_ready(crashing, {**state, "alloc": alloc}, timeout=5)
        await driver.destroy(s, state)
    run(_with_driver(stack, work))


def stack_allocations(stack: Hashistack, job_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.nomad}/v1/job/{job_id}/allocations", timeout=5, trust_env=False)
    return list(answer.json())


def test_a_job_nomad_refuses_is_reported_as_ours_not_as_nomad_down(
        stack: Hashistack, tmp_path: Path) -> None:
    template = json.loads((ROOT / "jobspecs" / "engine.docker.json").read_text())
    template["TaskGroups"][0]["Services"][0]["Name"] = "engine_${job_id}"   # not RFC 1123
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(template))
    # at start-up, through Nomad's own validator
    with pytest.raises(ConfigError, match=r"refused by Nomad.*RFC 1123"):
        NomadDriver(settings(stack, nomad_jobspec=broken))
    stack.clear_rejections()

    # and at register (Nomad answers 500): checked with the validator, a SchedulerRejected
    async def work(driver: NomadDriver) -> None:
        driver.settings = settings(stack, nomad_jobspec=broken)
        job = jobspec.render_job(driver.settings, spec("bad"))
        with pytest.raises(Exception) as info:
            await driver._register(job)
        assert info.value.__class__.__name__ == "SchedulerRejected"
        assert "RFC 1123" in str(info.value)
    run(_with_driver(stack, work))
    stack.clear_rejections()


def test_destroy_thaws_a_paused_engine_so_it_exits_on_sigterm(stack: Hashistack) -> None:
    async def work(driver: NomadDriver) -> None:
        s = spec("pz")
        state = await driver.create(s, "k1")
        state, _ = await driver.wait_ready(s, state, 20)
        await driver.pause(s, state)
        await driver.destroy(s, state)
        alloc = await driver._io(driver.api.allocation, state["alloc"])
        assert alloc is not None
        terminated = [e for e in alloc["TaskStates"]["engine"]["Events"]
                      if e["Type"] == "Terminated"]
        assert terminated[-1]["Signal"] == 0   # a clean exit on SIGTERM, not a SIGKILL
    run(_with_driver(stack, work))


def test_a_missing_capability_is_named(stack: Hashistack) -> None:
    write_only = {"namespace": ["list-jobs", "read-job", "submit-job", "host-volume-create",
                                "host-volume-read", "host-volume-delete", "alloc-lifecycle"],
                  "variables": {"nomad/jobs/*": ["write", "read", "list"]}, "node": "read",
                  "host_volume": {"e-*": ["mount-readwrite"]}}
    stack.acl({"orch": write_only})
    try:
        async def work(driver: NomadDriver) -> None:
            with pytest.raises(SchedulerUnavailable) as info:
                await driver._io(driver.api.delete_variable, "nomad/jobs/e-x-0123456789ab")
            assert "403 Permission denied" in str(info.value)
            assert "variables capability destroy on nomad/jobs/e-x-0123456789ab" in str(info.value)
        run(_with_driver(stack, work, nomad_token="orch"))
        # the complete policy of nomad/README.md is enough for a whole engine's life
        stack.acl({"orch": {**write_only, "variables": {"nomad/jobs/*": [
            "write", "read", "list", "destroy"]}}})

        async def life(driver: NomadDriver) -> None:
            s = spec("acl")
            state = await driver.create(s, "k1")
            state, _ = await driver.wait_ready(s, state, 20)
            await driver.set_key(s, state, "k2")
            assert s.name in await driver.list_names()
            await driver.destroy(s, state)
        run(_with_driver(stack, life, nomad_token="orch"))
    finally:
        stack.acl(None)
    assert httpx.get(f"{stack.nomad}/v1/jobs", trust_env=False).status_code == 200
    wait_for(lambda: not [a for a in stack.state()["allocs"] if a["client_status"] == "running"],
             what="every task stopped")
