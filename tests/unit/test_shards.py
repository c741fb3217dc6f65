"""The reconciler's work shared across replicas by shards leased in the
database: shared out evenly, handed over to a newcomer, taken over from a dead replica once its
lease ends, and each replica's reconciler looks only at its own shards' engines."""

from __future__ import annotations

import os
import time
from pathlib import Path

from app import registry
from app.reconciler import Reconciler
from app.registry import shards
from tests.inproc import World

LEASE = 10.0


def test_shards_are_shared_out_handed_over_and_taken_over(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        t = 1000.0
        assert len(shards.claim("a", LEASE, t)) == shards.SHARDS  # alone: everything
        assert shards.claim("b", LEASE, t + 1) == frozenset()  # all held by a live replica
        a = shards.claim("a", LEASE, t + 2)  # a sees b: gives back the half over its share
        b = shards.claim("b", LEASE, t + 3)
        assert len(a) == len(b) == shards.SHARDS // 2 and not a & b
        # a dies (stops renewing): b takes its shards once their lease has run out, not before.
        assert shards.claim("b", LEASE, t + 2 + LEASE - 0.5) == b
        assert len(shards.claim("b", LEASE, t + 2 + LEASE + 0.5)) == shards.SHARDS
        shards.release("b")
        assert shards.claim("c", LEASE, t + 13) == frozenset(range(shards.SHARDS))
    finally:
        world.close()


def test_three_replicas_split_the_shards(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        t = 1000.0
        held: dict[str, frozenset[int]] = {}
        for step in range(4):  # a few heartbeats each
            for owner in "abc":
                held[owner] = shards.claim(owner, LEASE, t + step)
        assert sorted(len(s) for s in held.values()) == [10, 11, 11]
        assert frozenset().union(*held.values()) == frozenset(range(shards.SHARDS))
    finally:
        world.close()


def test_each_reconciler_looks_only_at_its_own_shards(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        async def scenario() -> tuple[set[int], set[int], set[int]]:
            rows = [(await world.lifecycle.provision(world.product, f"u{n}"))[0] for n in range(8)]
            first, second = Reconciler(world.lifecycle), Reconciler(world.new_lifecycle())
            now = time.time()
            for _ in range(2):  # the second arrives, the first gives back half, both settle
                first.heartbeat(now)
                second.heartbeat(now)
                now += world.settings.lease_s / 2  # past a heartbeat period, within the lease
            one = {r.id for r in first.resync(now)}
            two = {r.id for r in second.resync(now)}
            return one, two, {r.id for r in rows}

        one, two, every = world.run(scenario())
        assert one and two and not one & two and one | two == every
        assert registry.shards.holders()  # seeded and held
    finally:
        world.close()


def test_a_replica_of_this_host_that_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    import socket
    import subprocess

    from app.reconciler import _gone

    host = socket.gethostname()[:32]
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert _gone(f"{host}:{dead.pid}:0a1b2c3d")
    assert not _gone(f"{host}:{os.getpid()}:0a1b2c3d")  # alive
    assert not _gone(f"another-host:{dead.pid}:0a1b2c3d")  # can't tell: its lease decides
    world = World(tmp_path)
    try:
        t = 1000.0
        assert len(shards.claim("a", LEASE, t)) == shards.SHARDS
        assert shards.claim("b", LEASE, t + 1) == frozenset()  # a is alive as far as b knows
        taken = shards.claim("b", LEASE, t + 2, gone=lambda owner: owner == "a")
        assert taken == frozenset(range(shards.SHARDS))  # long before a's lease ends
    finally:
        world.close()
