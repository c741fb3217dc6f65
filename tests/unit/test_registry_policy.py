from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from app import errors, policy, products, registry, states
from app.flights import Flights


def test_transition_is_compare_and_set(db) -> None:
    product, _ = products.create("p")
    engine = registry.insert_engine(product.id, "u", "e-p-u", "v1", "enc", "me", 10)
    stale = registry.reload(engine)
    engine = registry.transition(engine, "ready", url="http://x")
    assert engine.status == states.RUNNING
    with pytest.raises(errors.Conflict):
        registry.transition(stale, "boot_failed", "late")  # read before the change: loses
    assert registry.reload(engine).status == states.RUNNING
    events = [(e.event, e.from_status, e.to_status) for e in registry.events_for(product.id, "u")]
    assert events == [("ready", "provisioning", "running"), ("provision", None, "provisioning")]


def test_illegal_transition_changes_nothing(db) -> None:
    product, _ = products.create("p")
    engine = registry.insert_engine(product.id, "u", "e-p-u", "v1", "enc", "me", 10)
    with pytest.raises(states.IllegalTransition):
        registry.transition(engine, "sleep")
    assert registry.reload(engine).row_version == engine.row_version
    assert len(registry.events_for(product.id)) == 1


def test_quota_and_uniqueness(db) -> None:
    product, _ = products.create("p", max_engines=2)
    registry.insert_engine(product.id, "a", "e-a", "v", "k", "me", 10)
    with pytest.raises(errors.EngineAlreadyExists):
        registry.insert_engine(product.id, "a", "e-a2", "v", "k", "me", 10)
    registry.insert_engine(product.id, "b", "e-b", "v", "k", "me", 10)
    with pytest.raises(errors.QuotaExceeded):
        registry.insert_engine(product.id, "c", "e-c", "v", "k", "me", 10)


def test_quota_holds_across_threads(db, tmp_path: Path) -> None:
    """Separate connections (as separate replicas would have) racing for the last slots."""
    product, _ = products.create("p", max_engines=5)
    results: list[str] = []

    def worker(i: int) -> None:
        for _attempt in range(50):
            try:
                registry.insert_engine(product.id, f"u{i}", f"e-u{i}", "v", "k", "me", 10)
                results.append("ok")
                return
            except errors.QuotaExceeded:
                results.append("quota")
                return
            except Exception:
                time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("quota") == 15
    assert registry.Engine.select().count() == 5


def test_lease_is_exclusive_until_it_expires(db) -> None:
    product, _ = products.create("p")
    engine = registry.insert_engine(product.id, "u", "e", "v", "k", "a", 0.2)
    assert not registry.acquire_lease(engine, "b", 10)
    assert registry.acquire_lease(engine, "a", 10)  # the holder may renew
    registry.release_lease(engine, "a")
    assert registry.acquire_lease(engine, "b", 0.05)
    time.sleep(0.06)
    assert registry.acquire_lease(engine, "a", 10)  # expired: taken over


def test_gcra_limits_smoothly(db) -> None:
    product, _ = products.create("p", rate_limit_rpm=60)
    now = 1000.0
    allowed = [policy.admit_retry_after(product.id, 60, now) is None for _ in range(61)]
    assert allowed.count(True) == 60  # a burst of rpm
    assert policy.admit_retry_after(product.id, 60, now) == 1
    assert policy.admit_retry_after(product.id, 60, now + 1.0) is None  # one more a second
    assert policy.admit_retry_after(product.id, 60, now + 1.0) is not None
    # no 2x burst at a "minute boundary": 60s later only the drained slots come back
    later = now + 61.0
    assert sum(policy.admit_retry_after(product.id, 60, later) is None for _ in range(120)) == 60


def test_flights_coalesce_same_op_and_serialise_others() -> None:
    async def scenario() -> None:
        flights = Flights()
        calls: list[str] = []
        gate = asyncio.Event()

        async def slow(tag: str) -> str:
            calls.append(tag)
            await gate.wait()
            return tag

        joined = [asyncio.ensure_future(flights.run("k", "start", lambda: slow("start")))
                  for _ in range(50)]
        other = asyncio.ensure_future(flights.run("k", "stop", lambda: slow("stop")))
        await asyncio.sleep(0.01)
        assert calls == ["start"]  # one start ran; stop waits its turn
        gate.set()
        assert set(await asyncio.gather(*joined)) == {"start"}
        assert await other == "stop"
        assert calls == ["start", "stop"] and len(flights) == 0

    asyncio.run(scenario())


def test_writes_never_checkpoint_and_checkpoint_copies_the_wal(db, tmp_path: Path) -> None:
    """Autocheckpoint is off on the registry's connection (its fsync would stall the event
    loop); registry.checkpoint(), which the reconciler runs from a thread, does it instead."""
    if not registry.is_sqlite():
        pytest.skip("SQLite's WAL only")
    product, _ = products.create("p")
    engine = registry.insert_engine(product.id, "u", "e-p-u", "v", "x", "me", 1)
    for i in range(3000):  # a page a commit: three times SQLite's default threshold
        registry.touch_admit(engine.id, float(i))
    page = db.execute_sql("PRAGMA page_size").fetchone()[0]
    # With autocheckpoint the WAL would have been rewound at ~1000 pages and stay that size.
    assert (tmp_path / "orch.db-wal").stat().st_size > 2000 * page
    assert _main_file_value(tmp_path) is None  # the writes are all still in the WAL
    registry.checkpoint()
    assert _main_file_value(tmp_path) == 2999.0  # copied into the database file


def _main_file_value(tmp_path: Path) -> object:
    """last_admit_at as the database file alone has it (a copy without its WAL)."""
    import shutil
    import sqlite3

    shutil.copyfile(tmp_path / "orch.db", tmp_path / "main-only.db")
    conn = sqlite3.connect(tmp_path / "main-only.db")
    try:
        return conn.execute("SELECT last_admit_at FROM engine").fetchone()[0]
    except sqlite3.OperationalError:  # not even the table: everything is still in the WAL
        return None
    finally:
        conn.close()


def test_product_ids_are_never_reused(db) -> None:
    """A product made after another was deleted never sees its audit trail."""
    old, _ = products.create("tmp-x")
    engine = registry.insert_engine(old.id, "secret-user", "e-x", "v", "k", "me", 10)
    engine = registry.transition(engine, "destroy", "destroy")
    registry.delete_engine(engine)
    assert registry.events_for(old.id, "secret-user")
    products.delete("tmp-x")
    new, _ = products.create("tmp-y")
    assert new.id != old.id
    assert registry.events_for(new.id, "secret-user") == []
    assert registry.events_for(new.id) == []


def test_a_database_from_before_keeps_its_ids_and_gets_row_version(tmp_path: Path) -> None:
    """Migration: `version` becomes `row_version`, and ids used by deleted products (known
    only from their events) are not handed out again."""
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE product (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(32) NOT NULL,
            key_hash VARCHAR(64) NOT NULL, max_engines INTEGER NOT NULL,
            rate_limit_rpm INTEGER NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE engine (id INTEGER NOT NULL PRIMARY KEY, product_id INTEGER NOT NULL,
            user_id VARCHAR(128) NOT NULL, name VARCHAR(63) NOT NULL, status VARCHAR(16) NOT NULL,
            version INTEGER NOT NULL, engine_version VARCHAR(256) NOT NULL, url VARCHAR(256),
            key_enc TEXT NOT NULL, pending_key_enc TEXT, driver_state TEXT NOT NULL,
            restarts INTEGER NOT NULL, failure_reason VARCHAR(64), next_restart_at REAL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, status_since REAL NOT NULL,
            last_admit_at REAL, lease_owner VARCHAR(64), lease_until REAL);
        CREATE TABLE event (id INTEGER NOT NULL PRIMARY KEY, product_id INTEGER NOT NULL,
            user_id VARCHAR(128) NOT NULL, engine_name VARCHAR(63) NOT NULL, at REAL NOT NULL,
            event VARCHAR(32) NOT NULL, from_status VARCHAR(16), to_status VARCHAR(16),
            reason VARCHAR(256), request_id VARCHAR(128));
        INSERT INTO product VALUES (1, 'kept', 'h1', 5, 60, 0);
        INSERT INTO engine VALUES (1, 1, 'u', 'e-kept-u', 'running', 7, 'v', NULL, 'k', NULL,
            '{}', 0, NULL, NULL, 1.0, 1.0, 1.0, NULL, NULL, NULL);
        INSERT INTO event VALUES (1, 2, 'secret-user', 'e-gone', 1.0, 'destroyed', 'destroying',
            NULL, NULL, NULL);
    """)
    conn.close()
    database = registry.connect(f"sqlite:///{path}")
    try:
        row = registry.find_engine(1, "u")
        assert row is not None and row.row_version == 7
        product, _ = products.create("fresh")
        assert product.id == 3  # 2 was a deleted product's: its events stay its own
        # Events older than engine_id have none, and engine ids go on past
        # the highest one the database holds.
        old = registry.events_for(2, "secret-user")
        assert [e.engine_id for e in old] == [None]
        fresh = registry.insert_engine(product.id, "w", "e-fresh-w", "v", "k", "me", 1)
        assert fresh.id == 2
        assert [e.engine_id for e in registry.events_for(product.id, "w")] == [2]
    finally:
        database.close()


def test_engine_ids_are_never_reused(db) -> None:
    """SQLite hands the highest deleted id out again; the counter does not, so the events of
    a destroyed engine and of its successor keep apart."""
    product, _ = products.create("p")
    first = registry.insert_engine(product.id, "u", "e-p-u", "v", "k", "me", 1)
    registry.delete_engine(first)
    second = registry.insert_engine(product.id, "u", "e-p-u", "v", "k", "me", 1)
    assert second.id > first.id
    assert sorted({e.engine_id for e in registry.events_for(product.id, "u")}) == [first.id, second.id]
