"""Health checks spread over ORCH_HEALTH_INTERVAL_S, not all every tick;
engines that start running between two resyncs are picked up by an indexed read; idle
engines are found by one indexed query."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from app import registry, states
from app.drivers.base import EngineSpec, Probe, State
from app.health_schedule import HealthSchedule
from app.registry.db import hot_sql
from tests.inproc import World

ENGINES = 20
QUOTA = 10  # the World's product


def test_the_schedule_spreads_and_repeats_checks() -> None:
    schedule = HealthSchedule(1.0, random.Random(7))
    schedule.add(range(ENGINES), now=0.0)
    ticks = [schedule.due(t / 10) for t in range(1, 31)]  # three intervals of 0.1 s ticks
    per_tick = [len(due) for due in ticks]
    assert {i for due in ticks[:10] for i in due} == set(range(ENGINES))  # each in the first interval...
    assert max(per_tick) <= 4  # ...spread out: never all in one tick
    assert 2 * ENGINES <= sum(per_tick) <= 4 * ENGINES  # and again each interval, jittered


def test_soon_and_keep_only_among() -> None:
    schedule = HealthSchedule(10.0, random.Random(1))
    schedule.add([1, 2], now=0.0)
    schedule.soon(1, 0.5)
    assert schedule.due(0.5) == [1]
    schedule.keep_only_among([1, 2], {2})
    assert 1 not in schedule and 2 in schedule


def test_the_reconciler_checks_each_engine_once_an_interval(tmp_path: Path) -> None:
    world = World(tmp_path, health_interval_s=1.0, resync_s=1000.0, tick_s=0.1)
    probed: Counter[str] = Counter()
    real_probe = world.driver.probe

    async def counting_probe(spec: EngineSpec, state: State) -> Probe:
        probed[spec.name] += 1
        return await real_probe(spec, state)

    world.driver.probe = counting_probe  # type: ignore[method-assign]
    try:
        async def scenario() -> list[int]:
            for n in range(QUOTA - 1):
                await world.lifecycle.provision(world.product, f"u{n}")
            reconciler = world.reconciler
            reconciler.schedule._random = random.Random(3)
            now, per_tick = time.time(), []
            for step in range(21):  # two intervals
                before = reconciler.probes
                await reconciler.tick(now + step * 0.1)
                per_tick.append(reconciler.probes - before)
            late, _ = await world.lifecycle.provision(world.product, "late")
            await reconciler.tick(now + 2.15)  # no resync due: the indexed read finds it
            assert late.id in reconciler.schedule
            return per_tick

        per_tick = world.run(scenario())
        assert per_tick[0] == 0  # the first tick resyncs: checks are spread, none at once
        assert max(per_tick) <= 3, per_tick  # 9 engines over 10 ticks: never all at once
        assert sum(per_tick[:11]) >= QUOTA - 1, per_tick  # each checked in the first interval
        assert len(probed) == QUOTA - 1 and all(1 <= n <= 3 for n in probed.values()), probed
    finally:
        world.close()


def test_idle_engines_are_found_by_one_indexed_query(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        async def scenario() -> None:
            for user in ("idle", "busy", "never"):
                await world.lifecycle.provision(world.product, user)

        world.run(scenario())
        now = time.time()
        world.set("idle", last_admit_at=now - 100, status_since=now - 200)
        world.set("busy", last_admit_at=now - 1, status_since=now - 200)
        world.set("never", last_admit_at=None, status_since=now - 200)
        assert {r.user_id for r in registry.idle_running(now - 50)} == {"idle", "never"}
        world.set("never", status_since=now - 10)  # started lately: not idle yet
        assert {r.user_id for r in registry.idle_running(now - 50)} == {"idle"}
        if registry.is_sqlite():
            sql = hot_sql("idle_running", lambda p: "")  # built by the calls above
            plan = registry.db.execute_sql("EXPLAIN QUERY PLAN " + sql,
                                           (states.RUNNING, now, now, states.RUNNING, now)).fetchall()
            details = [str(step[-1]) for step in plan if "engine" in str(step[-1])]
            assert len(details) == 2, plan
            assert all("USING INDEX engine_status_last_admit_at" in d for d in details), plan
    finally:
        world.close()
