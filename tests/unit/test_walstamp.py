"""Admit's hot read answers from rows already read only while nothing was committed since
(app/registry/walstamp.py): a commit by this connection, by another connection or by another
process, before or after a checkpoint, is seen by the very next read; what a transaction has
not committed is never kept."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import products, registry
from app.registry import walstamp

HOT = "SELECT url FROM engine WHERE id = ?"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    if os.environ.get("ORCH_TEST_DB") == "postgres":
        pytest.skip("the WAL-index is SQLite's")
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


def test_the_stamp_is_the_wal_index_header_and_moves_with_each_commit(
        world: tuple[Path, int, int]) -> None:
    path, _, engine_id = world
    first = walstamp.stamp()
    assert first is not None and len(first) == walstamp.HEADER
    assert walstamp.stamp() == first  # reading changes nothing
    registry.touch_admit(engine_id, 1.0)  # this connection commits
    second = walstamp.stamp()
    assert second != first
    other = sqlite3.connect(path)
    other.execute("UPDATE engine SET last_admit_at = 2.0")
    other.commit()
    assert walstamp.stamp() != second
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL starts over: new salts
    third = walstamp.stamp()
    other.execute("UPDATE engine SET last_admit_at = 3.0")
    other.commit()
    other.close()
    assert walstamp.stamp() != third


def test_another_connections_commit_is_read_at_once(world: tuple[Path, int, int]) -> None:
    path, product_id, _ = world
    other = sqlite3.connect(path)
    try:
        for n in range(300):  # each read after a commit must see it, never the cached row
            other.execute("UPDATE engine SET url = ?", (f"http://127.0.0.1:{n}",))
            other.commit()
            assert url(product_id) == f"http://127.0.0.1:{n}"
            assert url(product_id) == f"http://127.0.0.1:{n}"  # the second from the cache
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
        raise Undo  # rolled back: no commit, so the stamp does not move
    assert url(product_id) == "http://127.0.0.1:1"


def test_no_stamp_where_there_is_no_wal_index(tmp_path: Path) -> None:
    if os.environ.get("ORCH_TEST_DB") == "postgres":
        pytest.skip("SQLite only")
    database = registry.connect("sqlite:///:memory:")
    try:
        assert walstamp.stamp() is None
    finally:
        database.close()


def _our_locks(path: Path) -> set[tuple[str, str, str]]:
    """The POSIX locks this process holds on `path` (/proc/locks: kind, start, end)."""
    st = path.stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if fields[1] == "POSIX" and fields[4] == str(os.getpid()) and fields[5] == device:
            held.add((fields[3], fields[6], fields[7]))
    return held


def test_mapping_the_header_keeps_sqlites_locks(world: tuple[Path, int, int]) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it:
    mapping the header must not open and close one of its own (SQLite's lock on the shm
    file says this connection is alive; without it another process may rebuild the file
    under ours: "locking protocol" errors)."""
    path, product_id, _ = world
    shm = Path(str(path) + "-shm")
    walstamp._remap(walstamp._mapping, registry.db.obj, None)  # forget the earlier mapping
    url(product_id)
    before = _our_locks(shm)
    assert before  # SQLite's, while the connection is open
    assert walstamp.stamp() is not None  # maps the header now
    assert _our_locks(shm) == before
    url(product_id)
    assert _our_locks(shm) == before
