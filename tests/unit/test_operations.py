"""Every row of the state table, through the operations table (Engines.run), in process (a real
SQLite registry, the real runner, a FakeDriver). Each test ends by checking the audit trail
walks along the table."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

import pytest

from app import errors, states
from app.bodies import Bodies
from app.drivers.base import EngineSpec, State
from app.operations import TABLE, Op
from app.registry import EngineRow
from tests.fake_driver import FakeDriver
from tests.inproc import Behaviour, World


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.close()


def make(tmp_path: Path, **behaviour: object) -> World:
    return World(tmp_path, Behaviour(**behaviour))  # type: ignore[arg-type]


def test_the_table_declares_every_operation_once_with_a_body() -> None:
    """Every operation has its row, keyed by its own name, and its body is one of Bodies'."""
    assert set(TABLE) == set(Op)
    for op, operation in TABLE.items():
        assert operation.op is op
        assert inspect.iscoroutinefunction(operation.body)
        assert getattr(Bodies, operation.body.__name__) is operation.body


def test_provision_then_ready(world: World) -> None:
    row, key = world.run(world.op(Op.PROVISION, "a"))
    assert row.status == states.RUNNING and row.url and key.startswith("eng_")
    assert world.driver.engines[row.name].key == key
    assert world.trail("a") == [("provision", None, "provisioning"), ("ready", "provisioning", "running")]
    assert world.row("a").lease_owner is None  # type: ignore[union-attr]


@pytest.mark.parametrize(("behaviour", "reason"), [
    ({"never_ready": True}, "boot_timeout"), ({"crash_after_start": True}, "crashed")])
def test_provision_that_never_gets_healthy_stays_failed(tmp_path: Path, behaviour: dict[str, bool],
                                                        reason: str) -> None:
    world = World(tmp_path, Behaviour(**behaviour), boot_timeout_s=0.3)
    try:
        with pytest.raises(errors.DriverError) as caught:
            world.run(world.op(Op.PROVISION, "b"))
        assert caught.value.code == "BOOT_TIMEOUT"
        row = world.row("b")
        assert row is not None and row.status == states.FAILED and row.failure_reason == reason
        assert row.url is None and world.driver.running() == set()  # its task stopped, brain kept
        world.assert_valid_trail("b")
    finally:
        world.close()


@pytest.mark.parametrize("fault", ["scheduler_down", "ports_exhausted"])
def test_a_provision_that_never_ran_leaves_nothing(tmp_path: Path, fault: str) -> None:
    world = make(tmp_path, **{fault: True})
    try:
        with pytest.raises(errors.DriverError) as caught:
            world.run(world.op(Op.PROVISION, "c"))
        assert caught.value.code == {"scheduler_down": "SCHEDULER_UNAVAILABLE",
                                     "ports_exhausted": "PORT_EXHAUSTION"}[fault]
        assert world.row("c") is None and world.driver.engines == {}
        assert world.trail("c")[-1][0] == "provision_failed"
    finally:
        world.close()


def test_stop_then_start_from_stopped(world: World) -> None:
    async def scenario() -> None:
        await world.op(Op.PROVISION, "s")
        stopped = await world.op(Op.STOP, "s")
        assert stopped.status == states.STOPPED and stopped.url is None
        with pytest.raises(errors.EngineNotRunning):
            await world.op(Op.STOP, "s")
        started = await world.op(Op.START, "s")
        assert started.status == states.RUNNING and started.restarts == 0
        with pytest.raises(errors.EngineAlreadyRunning):
            await world.op(Op.START, "s")

    world.run(scenario())
    assert [e for e, _, _ in world.trail("s")] == ["provision", "ready", "stop", "stopped", "start", "ready"]


class HungCopies(FakeDriver):
    """A brain that lives elsewhere (as on Nomad), changed, whose copy never ends (a store
    that accepts and never answers)."""

    def remote_snapshots(self) -> bool:
        return True

    async def brain_fingerprint(self, spec: EngineSpec, state: State) -> str:
        return "changed"

    async def copy_brain(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        self.calls.append(("copy_brain", spec.name))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_stop_waits_for_its_last_copy_no_longer_than_its_grace(tmp_path: Path) -> None:
    world = World(tmp_path, snapshot_interval_s=900.0, state_dir=tmp_path, stop_grace_s=0.3)
    world.driver = HungCopies()
    world.restart()
    try:
        async def scenario() -> EngineRow:
            await world.op(Op.PROVISION, "h")
            stopped: EngineRow = await world.op(Op.STOP, "h")
            return stopped
        stopped = world.run(scenario())
        assert stopped.status == states.STOPPED
        assert ("copy_brain", stopped.name) in world.driver.calls
        assert [e for e, _, _ in world.trail("h")] == ["provision", "ready", "stop", "stopped"]
    finally:
        world.close()


@pytest.mark.parametrize("source", [states.RUNNING, states.SLEEPING, states.FAILED,
                                    states.PROVISIONING, states.STARTING])
def test_stop_from_every_state_the_table_allows(tmp_path: Path, source: str) -> None:
    """provisioning/starting rows are ones a dead owner left: the stop settles them first."""
    world = World(tmp_path, Behaviour(stop_s=0.2), lease_s=0.3)
    try:
        async def scenario() -> str:
            await world.op(Op.PROVISION, "x")
            if source == states.SLEEPING:
                world.left_by_dead_owner("x", "sleep", lease_s=0)
            elif source == states.FAILED:
                world.left_by_dead_owner("x", "fail", lease_s=0, failure_reason="crashed")
            elif source in (states.PROVISIONING, states.STARTING):
                row = world.row("x")
                assert row is not None
                world.left_by_dead_owner("x", "fail", lease_s=0)
                world.left_by_dead_owner("x", "start")
                if source == states.PROVISIONING:
                    world.set("x", status=states.PROVISIONING)
            return (await world.op(Op.STOP, "x")).status

        assert world.run(scenario()) == states.STOPPED
        assert world.driver.running() == set()
    finally:
        world.close()


def test_a_slow_stop_is_waited_for_and_sigkill_is_the_drivers(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(stop_s=0.5), stop_grace_s=0.3)
    try:
        async def scenario() -> float:
            await world.op(Op.PROVISION, "slow")
            started = time.monotonic()
            await world.op(Op.STOP, "slow")
            return time.monotonic() - started

        assert world.run(scenario()) >= 0.3
        assert world.status("slow") == states.STOPPED
    finally:
        world.close()


@pytest.mark.parametrize("source", [states.RUNNING, states.STOPPED, states.SLEEPING, states.FAILED,
                                    states.PROVISIONING, states.STARTING, states.STOPPING])
def test_destroy_from_every_state(tmp_path: Path, source: str) -> None:
    world = World(tmp_path)
    try:
        async def scenario() -> None:
            await world.op(Op.PROVISION, "d")
            if source == states.STOPPED:
                await world.op(Op.STOP, "d")
            elif source != states.RUNNING:
                world.set("d", status=source)
            await world.op(Op.DESTROY, "d")
            with pytest.raises(errors.EngineNotFound):
                await world.op(Op.DESTROY, "d")

        world.run(scenario())
        assert world.row("d") is None and world.driver.engines == {}
        assert world.trail("d")[-1] == ("destroyed", "destroying", None)
    finally:
        world.close()


def test_an_explicit_operation_with_the_scheduler_down_changes_nothing(world: World) -> None:
    async def scenario() -> None:
        await world.op(Op.PROVISION, "z")
        before = world.row("z")
        world.driver.behaviour.scheduler_down = True
        for op in (Op.STOP, Op.DESTROY, Op.ROTATE):
            with pytest.raises(errors.SchedulerUnavailable):
                await world.op(op, "z")
        assert world.row("z") == before

    world.run(scenario())


def test_wake_resumes_a_paused_engine_and_falls_back_to_a_cold_start(world: World) -> None:
    async def scenario() -> None:
        row, _ = await world.op(Op.PROVISION, "w")
        world.left_by_dead_owner("w", "sleep", lease_s=0)
        world.driver.engines[row.name].paused = True
        woken = await world.op(Op.WAKE, "w")
        assert woken.status == states.RUNNING
        assert [c for c, _ in world.driver.calls].count("launch") == 1  # resumed, not relaunched
        world.left_by_dead_owner("w", "sleep", lease_s=0)
        world.driver.crash(row.name)  # its process is gone while asleep
        woken = await world.op(Op.WAKE, "w")
        assert woken.status == states.RUNNING
        assert [c for c, _ in world.driver.calls].count("launch") == 2  # a cold start

    world.run(scenario())
    world.assert_valid_trail("w")


def test_restart_counts_and_gives_up(tmp_path: Path) -> None:
    world = World(tmp_path, max_restarts=1)
    try:
        async def scenario() -> None:
            await world.op(Op.PROVISION, "r")
            world.left_by_dead_owner("r", "fail", lease_s=0, failure_reason="crashed")
            row = await world.op(Op.RESTART, "r")
            assert row.status == states.RUNNING and row.restarts == 1
            world.left_by_dead_owner("r", "fail", lease_s=0, failure_reason="crashed")
            row = await world.op(Op.RESTART, "r")
            assert row.status == states.FAILED  # out of restarts: left failed
            assert not world.engines.bodies.restartable(row)

        world.run(scenario())
    finally:
        world.close()


def test_a_dead_provision_with_nothing_launched_is_rolled_back(world: World) -> None:
    async def scenario() -> None:
        world.left_by_dead_owner("gone", "provision", lease_s=0)  # killed before the driver ran
        row = world.row("gone")
        assert row is not None
        await world.engines.run(Op.RECOVER, row.key)

    with pytest.raises(errors.EngineNotFound):
        world.run(scenario())
    assert world.row("gone") is None
    assert world.trail("gone")[-1] == ("provision_failed", "provisioning", None)


def test_a_dead_start_whose_engine_is_healthy_is_finished(world: World) -> None:
    async def scenario() -> None:
        await world.op(Op.PROVISION, "h")
        world.left_by_dead_owner("h", "fail", lease_s=0)
        world.left_by_dead_owner("h", "start", lease_s=0)
        row = world.row("h")
        assert row is not None
        world.driver.engines[row.name].running = True  # it came up after its owner died
        await world.engines.run(Op.RECOVER, row.key)

    world.run(scenario())
    assert world.status("h") == states.RUNNING
    world.assert_valid_trail("h")


def test_concurrent_different_operations_serialise(world: World) -> None:
    async def scenario() -> list[object]:
        await world.op(Op.PROVISION, "q")
        return list(await asyncio.gather(
            world.op(Op.STOP, "q"), world.op(Op.START, "q"),
            return_exceptions=True))

    stopped, started = world.run(scenario())
    assert getattr(stopped, "status", None) == states.STOPPED
    assert getattr(started, "status", None) == states.RUNNING
    world.assert_valid_trail("q")


def test_rotate_key_is_confirmed_by_the_engine(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(http=True))
    try:
        async def scenario() -> tuple[str, str]:
            _, old = await world.op(Op.PROVISION, "k")
            row, new = await world.op(Op.ROTATE, "k")
            assert world.engines.bodies.api_key(row) == new
            return old, new

        old, new = world.run(scenario())
        row = world.row("k")
        assert row is not None and row.pending_key_enc is None
        assert world.driver.engines[row.name].key == new != old
        assert world.trail("k")[-1] == ("rotate_key", "running", "running")
    finally:
        world.close()


def test_a_rotation_the_engine_does_not_take_keeps_the_old_key(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from app import bodies
    monkeypatch.setattr(bodies, "KEY_CONFIRM_S", 0.3)
    world = World(tmp_path, Behaviour(http=True, ignores_sighup=True))
    try:
        async def scenario() -> str:
            _, old = await world.op(Op.PROVISION, "k")
            with pytest.raises(errors.KeyNotConfirmed):
                await world.op(Op.ROTATE, "k")
            return old

        old = world.run(scenario())
        row = world.row("k")
        assert row is not None and row.pending_key_enc is None
        assert world.engines.bodies.api_key(row) == old
    finally:
        world.close()


@pytest.mark.parametrize("engine_took_it", [True, False])
def test_a_rotation_cut_short_by_a_crash_is_settled(tmp_path: Path, engine_took_it: bool) -> None:
    """The orchestrator died after writing the pending key: the next operation keeps the new
    key if the engine took it, else puts the old one back."""
    world = World(tmp_path, Behaviour(http=True))
    try:
        async def scenario() -> tuple[str, str]:
            row, old = await world.op(Op.PROVISION, "k")
            new = "eng_" + "n" * 40
            world.set("k", pending_key_enc=world.keys.encrypt(new), lease_owner="dead-owner",
                      lease_until=time.time() - 1)
            if engine_took_it:
                world.driver.engines[row.name].key = new
            stuck = world.row("k")
            assert stuck is not None
            await world.engines.run(Op.RECOVER, stuck.key)
            return old, new

        old, new = world.run(scenario())
        row = world.row("k")
        assert row is not None and row.pending_key_enc is None
        assert world.engines.bodies.api_key(row) == (new if engine_took_it else old)
        assert world.driver.engines[row.name].key == (new if engine_took_it else old)
        assert world.trail("k")[-1][0] == ("rotate_key" if engine_took_it else "rotate_key_rolled_back")
    finally:
        world.close()
