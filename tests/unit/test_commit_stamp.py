"""What the registry reads as "committed since": registry.commit_stamp, behind
registry.Changes (the reconciler's tick, the rollout poll), moves with every commit by this
connection, another connection or another process, before and after a checkpoint, and with
nothing else. Admit's hot read sees each such commit at the next admit, and never what a
transaction has not committed."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import peewee as pw
import pytest

from app import products, registry
from app.registry.db import commit_stamp
from app.registry.models import db


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    if os.environ.get("ORCH_TEST_DB") == "postgres":
        pytest.skip("the stamp is SQLite's")
    path = tmp_path / "orch.db"
    database = registry.connect(f"sqlite:///{path}")
    product, _ = products.create("p")
    engine = registry.insert_engine(product.id, "u", "e-p-u", "v1", "key", "me", 1)
    registry.Engine.update(status="running", url="http://127.0.0.1:1").where(
        registry.Engine.id == engine.id).execute()
    try:
        yield path, product.id, engine.id
    finally:
        database.close()


def url(product_id: int) -> str:
    row = registry.find_engine_hot(product_id, "u")
    assert row is not None
    return str(row[2])


def test_the_stamp_moves_with_each_commit_and_with_nothing_else(
        world: tuple[Path, int, int]) -> None:
    path, product_id, engine_id = world
    first = commit_stamp()
    assert first is not None
    registry.find_engine(product_id, "u")
    assert commit_stamp() == first  # reading changes nothing
    registry.touch_admit(engine_id, 1.0)  # this connection commits
    second = commit_stamp()
    assert second != first
    other = sqlite3.connect(path)
    other.execute("UPDATE engine SET last_admit_at = 2.0")
    other.commit()
    assert commit_stamp() != second
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL starts over
    third = commit_stamp()
    other.execute("UPDATE engine SET last_admit_at = 3.0")
    other.commit()
    other.close()
    assert commit_stamp() != third


def test_a_reopened_connection_never_matches_an_old_stamp(world: tuple[Path, int, int]) -> None:
    """data_version and total_changes count from each connection's opening: two fresh
    connections show the same numbers, which say nothing about what happened in between."""
    db.close()
    db.connect()
    fresh = commit_stamp()
    db.close()
    assert commit_stamp() is None  # closed: nothing to compare
    other = sqlite3.connect(world[0])
    other.execute("UPDATE engine SET url = 'http://127.0.0.1:2'")
    other.commit()
    other.close()
    db.connect()
    assert commit_stamp() != fresh


def test_another_connections_commit_is_read_at_once(world: tuple[Path, int, int]) -> None:
    path, product_id, _ = world
    other = sqlite3.connect(path)
    try:
        for n in range(300):  # each read after a commit must see it, never an older row
            other.execute("UPDATE engine SET url = ?", (f"http://127.0.0.1:{n}",))
            other.commit()
            assert url(product_id) == f"http://127.0.0.1:{n}"
            assert url(product_id) == f"http://127.0.0.1:{n}"
            if n % 50 == 49:
                other.execute("PRAGMA wal_checkpoint(RESTART)")
    finally:
        other.close()


def test_another_process_stopping_the_engine_is_read_at_once(world: tuple[Path, int, int]) -> None:
    path, product_id, _ = world
    assert registry.find_engine_hot(product_id, "u")[1] == "running"  # type: ignore[index]
    assert registry.find_engine_hot(product_id, "u")[1] == "running"  # type: ignore[index]
    subprocess.run([sys.executable, "-c", "import sqlite3, sys\n"
                    "c = sqlite3.connect(sys.argv[1])\n"
                    "c.execute(\"UPDATE engine SET status = 'stopped', url = NULL\")\n"
                    "c.commit()\n", str(path)], check=True, timeout=30)
    row = registry.find_engine_hot(product_id, "u")
    assert row is not None and row[1] == "stopped" and row[2] is None


def test_what_a_transaction_has_not_committed_is_not_kept(world: tuple[Path, int, int]) -> None:
    _, product_id, engine_id = world
    assert url(product_id) == "http://127.0.0.1:1"

    class Undo(Exception):
        pass

    with pytest.raises(Undo), registry.write_lock():
        registry.Engine.update(url="http://127.0.0.1:9").where(registry.Engine.id == engine_id).execute()
        assert url(product_id) == "http://127.0.0.1:9"  # its own transaction sees it
        raise Undo  # rolled back
    assert url(product_id) == "http://127.0.0.1:1"


def test_postgresql_has_no_stamp_and_always_reports_a_change() -> None:
    """No query is made: the database is only named, never connected."""
    previous = db.obj
    db.initialize(pw.PostgresqlDatabase("nowhere", host="127.0.0.1", port=1))
    try:
        assert commit_stamp() is None
        changes = registry.Changes()
        assert changes.since_last_look() is True
        assert changes.since_last_look() is True
    finally:
        db.initialize(previous)
