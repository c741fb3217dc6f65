"""Issue 13's commands: `orch rollout ...` (driven by the running server) and `orch engines
upgrade`, against a real orchestrator and real engines; brains read back at the end."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.harness import running


def test_rollout_commands_and_engines_upgrade(tmp_path: Path) -> None:
    with running(tmp_path, "local") as orch:
        api = orch.client("acme", timeout=60)
        keys = {}
        for user in ("a", "b"):
            engine = api.post("/engines/provision", json={"user_id": user, "engine_version": "ref-1"}).json()
            keys[user] = engine["api_key"]
            httpx.put(engine["url"] + "/v1/memory/me", content=user.encode(), trust_env=False,
                      headers={"Authorization": f"Bearer {engine['api_key']}"}).raise_for_status()

        started = json.loads(orch.cli("rollout", "start", "acme", "ref-2", "--batch-size", "1").stdout)
        assert (started["status"], started["total"]) == ("running", 2)
        followed = orch.cli("rollout", "status", str(started["id"]), "--follow")
        final = json.loads(followed.stdout[followed.stdout.index("{"):])
        assert (final["status"], final["upgraded"]) == ("succeeded", 2), followed.stdout
        assert "2 upgraded, 0 failed, 0 remaining" in followed.stdout  # the progress bar's last state
        listed = json.loads(orch.cli("rollout", "list", "acme").stdout)
        assert [r["id"] for r in listed] == [started["id"]]

        # Slow boots, one engine a batch (12 s at least), so the pause, a CLI process that may
        # take seconds to start on a loaded machine, comes while the rollout runs.
        paused_one = json.loads(orch.cli("rollout", "start", "acme", "ref-3+boot-delay-6000",
                                         "--batch-size", "1").stdout)
        paused = json.loads(orch.cli("rollout", "pause", str(paused_one["id"])).stdout)
        assert paused["status"] == "paused"
        aborted = json.loads(orch.cli("rollout", "abort", str(paused_one["id"])).stdout)
        assert aborted["status"] == "aborted"
        refused = orch.cli("rollout", "resume", str(paused_one["id"]), check=False)
        assert refused.returncode == 1 and "aborted" in refused.stderr
        assert orch.cli("rollout", "status", "999999", check=False).returncode == 1

        upgraded = json.loads(orch.cli("engines", "upgrade", "acme", "a", "ref-4").stdout)
        assert (upgraded["status"], upgraded["engine_version"]) == ("running", "ref-4")
        failed = orch.cli("engines", "upgrade", "acme", "b", "ref-5+fault-crash", check=False)
        assert failed.returncode == 1 and "UPGRADE_FAILED" in failed.stderr

        for user, key in keys.items():
            engine = api.get(f"/engines/{user}").json()
            assert engine["status"] == "running"
            got = httpx.get(engine["url"] + "/v1/memory/me", trust_env=False,
                            headers={"Authorization": f"Bearer {key}"})
            assert got.content == user.encode()
