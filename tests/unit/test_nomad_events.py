"""The Nomad driver: an engine's end comes from Nomad's event stream (resumed after
a drop), a check that stops passing from Consul's blocking queries, and an event lost on the
way is caught by the resync's audit."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from app.config import ConfigError, Settings
from app.drivers.base import EngineSpec, State
from app.drivers.nomad import NomadDriver
from tests.doubles.fixture import Hashistack, served
from tests.harness import ROOT, free_port_range

pytestmark = pytest.mark.timeout(120)
WAIT_S = 15.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("nomad-events"), free_port_range(10), nodes=1,
               dev=True) as hs:
        yield hs


def spec(user: str) -> EngineSpec:
    return EngineSpec(f"e-acme-{user}-0123456789ab", "acme", user, "0.1.0")


class Heard:
    """The names the driver reported, awaitable."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self.changed.set()

    async def wait(self, name: str, timeout: float = WAIT_S) -> None:
        async def heard() -> None:
            while name not in self.names:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(heard(), timeout)


async def _until(predicate: Any, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _start(stack: Hashistack, user: str) -> tuple[NomadDriver, Heard, EngineSpec, State]:
    driver = NomadDriver(Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul,
                                  nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json",
                                  stop_grace_s=2.0))
    heard = Heard()
    assert driver.on_exit(heard)
    s = spec(user)
    state = await driver.create(s, "k1")
    state, _ = await driver.wait_ready(s, state, 20)
    assert driver.events.alloc_of[s.name] == state["alloc"]   # running: watched from now on
    await _until(lambda: driver.events.frames > 0 and driver.events.health is not None)
    return driver, heard, s, state


def _pid(stack: Hashistack, alloc_id: str) -> int:
    (alloc,) = [a for a in stack.state()["allocs"] if a["id"] == alloc_id]
    return int(alloc["pids"]["engine"])


def _reads(stack: Hashistack) -> int:
    return sum(r["count"] for r in stack.requests() if r["method"] == "GET"
               and r["route"] in ("/v1/allocations", "/v1/allocation/{alloc_id}"))


def test_a_crash_comes_from_the_stream_even_after_it_dropped(stack: Hashistack) -> None:
    async def work() -> None:
        driver, heard, s, state = await _start(stack, "crash")
        try:
            drops = driver.events.drops
            await asyncio.to_thread(stack.drop_event_streams)
            await _until(lambda: driver.events.drops > drops)   # cut, then resumed at its index
            await _until(lambda: driver.events.audits == 1)     # what the gap may have hidden
            os.kill(_pid(stack, state["alloc"]), signal.SIGKILL)
            await heard.wait(s.name)
            reads = await asyncio.to_thread(_reads, stack)
            assert await driver.probe(s, state) == "dead"       # from the event: no read
            assert await asyncio.to_thread(_reads, stack) == reads
            assert driver.events.audits == 1
        finally:
            await driver.destroy(s, state)
            await driver.close()
    asyncio.run(work())


def test_a_check_that_stops_passing_comes_from_consul(stack: Hashistack) -> None:
    async def work() -> None:
        driver, heard, s, state = await _start(stack, "hung")
        pid = _pid(stack, state["alloc"])
        try:
            os.kill(pid, signal.SIGSTOP)   # alive to Nomad, silent to Consul's check
            await heard.wait(s.name)
            assert driver.events.health and driver.events.health[s.name] == "critical"
            assert await driver.probe(s, state) == "unhealthy"
        finally:
            os.kill(pid, signal.SIGCONT)
            await driver.destroy(s, state)
            await driver.close()
    asyncio.run(work())


def test_a_lost_event_is_caught_by_the_resync(stack: Hashistack) -> None:
    async def work() -> None:
        driver, heard, s, state = await _start(stack, "lost")
        try:
            # no frame reaches the stream, and Consul is away (its check would tell us too)
            await asyncio.to_thread(stack.fault, lose_events=1000, consul_down=True)
            os.kill(_pid(stack, state["alloc"]), signal.SIGKILL)

            def failed() -> bool:
                return any(a["id"] == state["alloc"] and a["client_status"] == "failed"
                           for a in stack.state()["allocs"])
            await _until(failed)
            await asyncio.sleep(0.5)
            assert s.name not in heard.names and driver.events.audits == 0
            driver.watch(s, state)   # what the reconciler's resync does for every running row
            await heard.wait(s.name)
            assert driver.events.audits == 1
            assert await driver.probe(s, state) == "dead"
        finally:
            await asyncio.to_thread(stack.fault, lose_events=0, consul_down=False)
            await driver.destroy(s, state)
            await driver.close()
    asyncio.run(work())


def test_events_can_be_switched_off(stack: Hashistack) -> None:
    assert Settings.from_env({}).nomad_events
    assert not Settings.from_env({"ORCH_NOMAD_EVENTS": "off"}).nomad_events
    with pytest.raises(ConfigError, match="ORCH_NOMAD_EVENTS"):
        Settings.from_env({"ORCH_NOMAD_EVENTS": "maybe"})

    async def work() -> None:
        driver = NomadDriver(Settings(driver="nomad", nomad_addr=stack.nomad,
                                      consul_addr=stack.consul, nomad_events=False,
                                      nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json"))
        try:
            assert not driver.on_exit(Heard())   # the reconciler's checks alone, as before
            driver.watch(spec("off"), {"alloc": "a"})
            assert driver.events._tasks == []
        finally:
            await driver.close()
    asyncio.run(work())


def _probe_reads(stack: Hashistack) -> int:
    """Reads a health check could make: the fleet snapshot's allocation listing (with
    Consul's /v1/health/state/any, left out: the follower's blocking query reads it too) and
    the direct reads that confirm bad news."""
    routes = ("/v1/allocations", "/v1/allocation/{alloc_id}", "/v1/health/service/{name}")
    return sum(r["count"] for r in stack.requests() if r["method"] == "GET" and r["route"] in routes)


def test_a_scheduled_check_reads_nothing_while_the_events_are_live(stack: Hashistack) -> None:
    """At rest: with the event stream and Consul's blocking query live, a healthy
    engine's check is answered from what they said (no call); after a drop, not until the
    audit has looked for the ends the gap may have hidden; with events off, from the fleet
    snapshot as before."""
    async def work() -> None:
        driver, _, s, state = await _start(stack, "rest")
        try:
            reads = await asyncio.to_thread(_probe_reads, stack)
            for _ in range(5):
                assert await driver.probe(s, state) == "healthy"
            assert await asyncio.to_thread(_probe_reads, stack) == reads
            assert (driver.prober.from_events, driver.prober.from_snapshot) == (5, 0)

            drops, audits = driver.events.drops, driver.events.audits
            await asyncio.to_thread(stack.drop_event_streams)
            await _until(lambda: driver.events.drops > drops)
            if driver.events.audits == audits:   # resumed, the gap not yet audited: a snapshot
                assert not driver.events.nomad_live
            await _until(lambda: driver.events.audits > audits)
            await _until(lambda: driver.events.nomad_live)
            before = driver.prober.from_events
            assert await driver.probe(s, state) == "healthy"
            assert driver.prober.from_events == before + 1
        finally:
            await driver.destroy(s, state)
            await driver.close()
    asyncio.run(work())


def test_without_events_a_check_reads_the_fleet_snapshot(stack: Hashistack) -> None:
    async def work() -> None:
        driver = NomadDriver(Settings(driver="nomad", nomad_addr=stack.nomad,
                                      consul_addr=stack.consul, nomad_events=False, tick_s=1.0,
                                      nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json",
                                      stop_grace_s=2.0))
        s = spec("snap")
        state = await driver.create(s, "k1")
        try:
            state, _ = await driver.wait_ready(s, state, 20)
            assert driver.events.health_of(s.name, state["alloc"]) is None   # not following
            listings = await asyncio.to_thread(_listings, stack)
            assert await driver.probe(s, state) == "healthy"
            assert await driver.probe(s, state) == "healthy"   # the same pass: the same snapshot
            assert await asyncio.to_thread(_listings, stack) == listings + 1
            assert (driver.prober.from_events, driver.prober.from_snapshot) == (0, 2)
        finally:
            await driver.destroy(s, state)
            await driver.close()
    asyncio.run(work())


def _listings(stack: Hashistack) -> int:
    return sum(r["count"] for r in stack.requests()
               if r["method"] == "GET" and r["route"] == "/v1/allocations")
