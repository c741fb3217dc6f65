"""End to end: an orchestrator SIGKILLed in the middle of destroying an
engine that ignores SIGTERM, restarted, then asked to admit that user with auto_provision. The
admit must answer within ORCH_BOOT_TIMEOUT_S (not wait out the boot timeout, the stop grace
and two leases, then answer 503), and the reconciler and a DELETE are not blocked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.engines import assert_consistent
from tests.harness import running, wait_for

ENV = {"ORCH_BOOT_TIMEOUT_S": "20", "ORCH_LEASE_S": "5", "ORCH_STOP_GRACE_S": "3"}


def test_admit_after_a_crash_mid_destroy(tmp_path: Path) -> None:
    with running(tmp_path, "local", env=ENV) as orch:
        api = orch.client("acme")
        r = api.post("/engines/provision", json={"user_id": "dl", "engine_version": "v1+fault-hang-term"})
        assert r.status_code == 200, r.text
        deleting = threading.Thread(target=_delete_quietly, args=(orch.client("acme"),))
        deleting.start()
        wait_for(lambda: (orch.engine_row("dl") or {}).get("status") == "destroying", timeout=15,
                 what="the destroy to begin")
        time.sleep(1.0)  # SIGKILL 1 s into DELETE (its engine ignores SIGTERM: still stopping)
        orch.restart()
        deleting.join(timeout=30)
        api = orch.client("acme", timeout=60)
        started = time.monotonic()
        admitted = api.post("/engines/dl/admit", json={"auto_provision": True})
        elapsed = time.monotonic() - started
        assert admitted.status_code == 200, admitted.text
        assert admitted.json()["admitted"] is True and admitted.json()["provisioned"] is True
        assert elapsed < float(ENV["ORCH_BOOT_TIMEOUT_S"])
        kinds = [e["event"] for e in reversed(api.get("/engines/dl/events").json()["events"])]
        assert kinds[-4:] == ["destroy", "destroyed", "provision", "ready"]
        # Nothing left stuck: a DELETE goes through, and the registry matches the machine.
        assert api.delete("/engines/dl").status_code == 200
        wait_for(lambda: orch.engine_row("dl") is None, timeout=10, what="the row gone")
        assert_consistent(orch)


def _delete_quietly(client: httpx.Client) -> None:
    try:
        client.delete("/engines/dl")
    except httpx.HTTPError:
        pass  # the server died under it: expected
