"""The Nomad driver on nodes that fill up: the volume pins the job to its node
(scheduler/feasible.go HostVolumeChecker), so the node is chosen with room for the job, and a
placement that still fails for capacity moves the new, empty volume to another node; only when
no node can take the engine is it 503 CAPACITY_EXHAUSTED."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.drivers.base import CapacityExhausted
from app.drivers.nomad import NomadDriver
from tests.doubles.fixture import Hashistack, served
from tests.doubles.state import node_id
from tests.harness import free_port_range
from tests.unit.test_nomad_driver import _with_driver, run, spec

pytestmark = pytest.mark.timeout(120)
CREATE = ("PUT", "/v1/volume/host/create")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: each move waits for a new volume's node update (1 s here, 5-10 s in
    # production); what is tested is where the volumes go
    with served(tmp_path_factory.mktemp("capacity"), free_port_range(10), nodes=3,
                dev=True) as hs:
        yield hs


def creates(stack: Hashistack) -> int:
    return sum(r["count"] for r in stack.requests() if (r["method"], r["route"]) == CREATE)


def test_a_full_first_node_is_passed_over(stack: Hashistack) -> None:
    stack.node_resources(node_id(1), memory_mb=64)   # less than an engine and its sidecar
    before = creates(stack)
    try:
        async def work(driver: NomadDriver) -> str:
            s = spec("roomy")
            state = await driver.create(s, "k1")
            try:
                state, _ = await driver.wait_ready(s, state, 20)
                return str(state["node"])
            finally:
                await driver.destroy(s, state)
        node = run(_with_driver(stack, work))
    finally:
        stack.node_resources(node_id(1), memory_mb=8192)
    assert node != node_id(1)
    assert creates(stack) - before == 1   # chosen with room, not found full by trying


def test_a_placement_refused_for_capacity_moves_the_volume_until_no_node_is_left(
        stack: Hashistack) -> None:
    """Every node looks roomy but the scheduler finds each short of memory: the driver tries
    each node once, deletes each new volume, and answers CAPACITY_EXHAUSTED."""
    before = creates(stack)
    stack.fault(memory_exhausted=True)
    try:
        async def work(driver: NomadDriver) -> str:
            with pytest.raises(CapacityExhausted) as info:
                await driver.create(spec("nowhere"), "k1")
            return str(info.value)
        message = run(_with_driver(stack, work))
    finally:
        stack.fault(memory_exhausted=False)
    assert creates(stack) - before == 3   # one volume on each node in turn
    left = stack.state()
    assert not [v for v in left["volumes"] if v["name"] == spec("nowhere").name]
    assert spec("nowhere").name not in left["jobs"]
    assert "could not place" in message and "memory" in message and "no other node" in message
