"""End to end: two (three) orchestrator processes on one database share the
reconciler's shards; one is SIGKILLed, the others take all its shards over within
ORCH_LEASE_S (on one host at once: it sees the dead pid; tests/unit/test_shards.py covers
the lease running out) and then notices the crash of an engine the dead one had launched."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from app.registry.shards import SHARDS, shard_of
from tests.harness import Orchestrator, running, wait_for

LEASE_S = 3.0
USERS = 8
# No health check and no periodic resync within the test: what notices the crash is the
# survivor's resync on taking shards over, and the exit event of the pidfd it then watches.
ENV = {"ORCH_LEASE_S": str(LEASE_S), "ORCH_HEALTH_INTERVAL_S": "3600", "ORCH_RESYNC_S": "3600",
       "ORCH_MAX_RESTARTS": "0"}


def live_holders(orch: Orchestrator) -> dict[str, int]:
    rows = orch.rows("SELECT owner, COUNT(*) FROM shard_lease WHERE until > ? GROUP BY owner",
                     time.time())
    return {str(owner): int(n) for owner, n in rows if owner}


def shared_evenly(orch: Orchestrator, replicas: int) -> dict[str, int] | None:
    """Every shard held, by `replicas` owners, none holding more than one more than another.
    Not every moment on the way is even: a replica gives back its surplus only at its next
    heartbeat after another joins, so the split is waited for, not sampled once."""
    h = live_holders(orch)
    even = len(h) == replicas and sum(h.values()) == SHARDS and max(h.values()) - min(h.values()) <= 1
    return h if even else None


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_dead_replicas_shards_are_taken_over(tmp_path: Path, replicas: int) -> None:
    with running(tmp_path, "local", env=ENV, ports=20) as first:
        others = [first.replica() for _ in range(replicas - 1)]
        try:
            split = wait_for(lambda: shared_evenly(first, replicas), timeout=20,
                             what="the replicas to share the shards evenly")
            with first.client("acme") as api:
                for n in range(USERS):
                    assert api.post("/engines/provision", json={"user_id": f"u{n}"}).status_code == 200
            held = dict(first.rows("SELECT shard, owner FROM shard_lease"))
            # Running for a minute already: out of reach of the reads of recent changes.
            first.execute("UPDATE engine SET status_since = status_since - 60")
            first.kill()  # SIGKILL
            killed_at = time.monotonic()
            after = wait_for(lambda: shared_evenly(first, replicas - 1), timeout=LEASE_S * 4,
                             what="the survivors to hold every shard, evenly")
            took = time.monotonic() - killed_at
            print(f"shards taken over {took:.2f}s after the SIGKILL (ORCH_LEASE_S={LEASE_S})")
            (dead,) = set(split) - set(after)
            # An engine of a shard the dead replica held: only the takeover looks at it.
            rows = [first.engine_row(f"u{n}") for n in range(USERS)]
            theirs = [r for r in rows if r and held[shard_of(r["id"])] == dead]
            assert theirs, "no engine in the dead replica's shards"
            row = theirs[0]

            os.kill(json.loads(row["driver_state"])["pid"], signal.SIGKILL)
            user = row["user_id"]
            wait_for(lambda: (r := first.engine_row(user)) and r["status"] == "failed", timeout=10,
                     what=f"{user} failed")
            failed = first.engine_row(user)
            assert failed is not None and failed["failure_reason"] == "crashed"
            rest = [first.engine_row(f"u{n}") for n in range(USERS)]
            assert [r["status"] for r in rest if r and r["user_id"] != user] == ["running"] * (USERS - 1)
        finally:
            for other in others:
                other.kill()
