"""Issue 11 on the Nomad driver, through the orchestrator: a crash is failed from Nomad's event
stream with no resync and no scheduled health check in sight, and a crash whose events are all
lost is failed by the resync."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.harness import running, wait_for
from tests.scheduler import needs_double

NEVER = "3600"  # a resync or a scheduled health check this far away does not happen in a test


def _kill(engine: dict[str, Any]) -> None:
    info = httpx.get(engine["url"] + "/v1/info", timeout=5, trust_env=False,
                     headers={"Authorization": f"Bearer {engine['api_key']}"}).json()
    os.kill(info["pid"], signal.SIGKILL)


def _failed_as(api: Any, user: str) -> str | None:
    got = api.get(f"/engines/{user}").json()
    return got["failure_reason"] if got["status"] == "failed" else None


def test_a_crash_is_failed_from_the_event_stream(tmp_path: Path) -> None:
    env = {"ORCH_RESYNC_S": NEVER, "ORCH_HEALTH_INTERVAL_S": NEVER, "ORCH_MAX_RESTARTS": "0"}
    with running(tmp_path, "nomad", env=env) as orch:
        api = orch.client("acme")
        engine = api.post("/engines/provision", json={"user_id": "ann"}).json()
        _kill(engine)
        assert wait_for(lambda: _failed_as(api, "ann"), timeout=15, what="failed") == "crashed"


def test_a_crash_whose_events_are_lost_is_failed_by_the_resync(tmp_path: Path) -> None:
    env = {"ORCH_RESYNC_S": "2", "ORCH_HEALTH_INTERVAL_S": NEVER, "ORCH_MAX_RESTARTS": "0"}
    with running(tmp_path, "nomad", env=env) as orch:
        stack = needs_double(orch)
        api = orch.client("acme")
        engine = api.post("/engines/provision", json={"user_id": "bea"}).json()
        # Nomad's frames never reach the stream, and Consul (whose check would tell) is away
        stack.fault(lose_events=1000, consul_down=True)
        try:
            _kill(engine)
            assert wait_for(lambda: _failed_as(api, "bea"), timeout=15, what="failed") == "crashed"
        finally:
            stack.fault(lose_events=0, consul_down=False)
