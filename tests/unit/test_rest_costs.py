"""The cost at rest on the local driver: what a health check does not do (a /proc read for
an engine its pidfd watches, a new connection each time), what the orphan sweep does not
read (the environ of an engine it knows), and a checkpoint with nothing to copy
skipped. Real engine processes (the reference engine), real sockets, a real database file."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app import products, registry
from app.drivers import _process
from app.registry.db import CHECKPOINT_BYTES, CHECKPOINT_S, checkpoint_due
from tests.unit.test_fleet_events import cleanup, local_world


def test_a_watched_engine_is_checked_on_one_kept_connection_without_reading_proc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = local_world(tmp_path)
    reads: list[int] = []
    real_status = _process.status

    def counted(pid: int, started: int | None) -> str:
        reads.append(pid)
        return real_status(pid, started)

    try:
        async def scenario() -> None:
            row, _ = await world.lifecycle.provision(world.product, "w")
            driver: Any = world.driver.inner  # type: ignore[attr-defined]  # the LocalDriver
            pid = row.driver_state["pid"]
            assert driver.exits.watching(row.name) == pid
            monkeypatch.setattr(_process, "status", counted)
            try:
                for _ in range(3):
                    assert await world.lifecycle.probe(row) == "healthy"
                assert reads == []  # its pidfd says it runs: no /proc read
                assert len(driver.checks) == 1
                # A check that fails is when /proc tells dead, paused and hung apart.
                os.killpg(pid, signal.SIGSTOP)
                try:
                    # A stop is taken by one thread and only then stops the others: until
                    # every thread is stopped, the engine's request thread can still answer.
                    await _all_threads_stopped(pid)
                    assert await world.lifecycle.probe(row) == "paused"
                finally:
                    os.killpg(pid, signal.SIGCONT)
                assert reads == [pid]
                assert await world.lifecycle.probe(row) == "healthy"
                # An engine nobody watches is looked up in /proc first.
                driver.exits.forget(row.name)
                assert await world.lifecycle.probe(row) == "healthy"
                assert reads == [pid, pid]
                await world.lifecycle.stop(world.product, "w")
                assert len(driver.checks) == 0  # stopped: closed
            finally:
                monkeypatch.setattr(_process, "status", real_status)
                await cleanup(world, "w")

        world.run(scenario())
    finally:
        world.close()


def test_the_orphan_scan_reads_neither_a_watched_engine_nor_a_known_other_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = local_world(tmp_path)
    read: list[int] = []
    real_engine_of = _process._engine_of
    other = subprocess.Popen(["sleep", "30"])  # a process that is no engine

    def counted(pid: int, prefix: str) -> str | None:
        read.append(pid)
        return real_engine_of(pid, prefix)

    try:
        async def scenario() -> None:
            row, _ = await world.lifecycle.provision(world.product, "o")
            pid = row.driver_state["pid"]
            brains = world.settings.brain_root.resolve()
            monkeypatch.setattr(_process, "_engine_of", counted)
            try:
                assert _process.engines_under(brains).get(row.name) == [pid]  # found by environ
                assert pid in read
                read.clear()
                known = world.driver.inner.exits.pids()  # type: ignore[attr-defined]
                assert known == {pid: row.name}
                assert _process.engines_under(brains, known).get(row.name) == [pid]
                assert pid not in read and read  # every other process is still read
                assert row.name in await world.driver.list_names()
                # The sweep's scan remembers processes that are not engines (seen so twice),
                # and an engine nobody watches once found (read once, then known by its /proc
                # entry: another replica's engines, every lease).
                scan = _process.EngineScan()
                for n in range(3):
                    read.clear()
                    assert scan.run(brains).get(row.name) == [pid]
                    assert (pid in read) is (n == 0), n
                    assert (other.pid in read) is (n < 2), n
            finally:
                monkeypatch.setattr(_process, "_engine_of", real_engine_of)
                await cleanup(world, "o")

        world.run(scenario())
    finally:
        other.kill()
        other.wait()
        world.close()


def test_a_checkpoint_is_due_for_a_big_wal_or_an_old_change_not_for_nothing(tmp_path: Path) -> None:
    database = registry.connect(f"sqlite:///{tmp_path / 'orch.db'}")
    try:
        product, _ = products.create("p")
        engine = registry.insert_engine(product.id, "u", "e-p-u", "v", "x", "me", 1)
        assert checkpoint_due(100.0) is True
        assert checkpoint_due(200.0) is False  # nothing written since
        registry.touch_admit(engine.id, 1.0)
        assert checkpoint_due(101.0) is False  # a few pages: they wait for CHECKPOINT_S
        assert checkpoint_due(100.0 + CHECKPOINT_S) is True
        registry.checkpoint()  # copies into the database file; the WAL itself is unchanged
        assert checkpoint_due(500.0) is False
        for n in range(400):  # a big WAL is due at once
            registry.touch_admit(engine.id, 2.0 + n)
        assert Path(f"{tmp_path / 'orch.db'}-wal").stat().st_size >= CHECKPOINT_BYTES
        assert checkpoint_due(501.0) is True
    finally:
        database.close()


def test_changes_sees_this_connections_writes_and_any_other_connections(tmp_path: Path) -> None:
    import sqlite3

    database = registry.connect(f"sqlite:///{tmp_path / 'orch.db'}")
    try:
        changes = registry.Changes()
        assert changes.since_last_look() is True  # the first look
        assert changes.since_last_look() is False
        product, _ = products.create("p")  # this connection writes
        assert changes.since_last_look() is True
        assert changes.since_last_look() is False
        other = sqlite3.connect(tmp_path / "orch.db")  # another process, replica or the CLI
        other.execute("UPDATE product SET name = name")
        other.commit()
        other.close()
        assert changes.since_last_look() is True
        assert changes.since_last_look() is False
        registry.find_engine(product.id, "nobody")  # reading is no change
        assert changes.since_last_look() is False
    finally:
        database.close()


_STATUS = _process.status


async def _all_threads_stopped(pid: int, timeout: float = 10.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        # /proc/<tid>/stat is each thread's own, read by the driver's parser (as imported:
        # the test counts the calls of the one it patches in).
        states = [_STATUS(int(tid), None) for tid in os.listdir(f"/proc/{pid}/task")]
        if all(state == "paused" for state in states):
            return
        assert time.monotonic() < deadline, f"threads of {pid} not stopped: {states}"
        await asyncio.sleep(0.01)
