"""The rollout commands: `orch rollout ...` (driven by the running server) and `orch engines
upgrade`, against a real orchestrator and real engines; brains read back at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import ROOT, Orchestrator, running


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
        assert "no ORCH_PLATFORM_KEY: following the database" in followed.stderr
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
        assert orch.cli("rollout", "status", "999999", check=False).returncode == 4  # not found

        upgraded = json.loads(orch.cli("engines", "upgrade", "acme", "a", "ref-4").stdout)
        assert (upgraded["status"], upgraded["engine_version"]) == ("running", "ref-4")
        failed = orch.cli("engines", "upgrade", "acme", "b", "ref-5+fault-crash", check=False)
        assert failed.returncode == 5 and "UPGRADE_FAILED" in failed.stderr

        for user, key in keys.items():
            engine = api.get(f"/engines/{user}").json()
            assert engine["status"] == "running"
            got = httpx.get(engine["url"] + "/v1/memory/me", trust_env=False,
                            headers={"Authorization": f"Bearer {key}"})
            assert got.content == user.encode()


def test_status_follow_reads_the_servers_event_stream(tmp_path: Path) -> None:
    with running(tmp_path, "local") as orch:
        api = orch.client("acme", timeout=60)
        for user in ("a", "b", "c"):
            engine = api.post("/engines/provision", json={"user_id": user, "engine_version": "ref-1"})
            assert engine.status_code == 200, engine.text
        orch.product("other")
        slow = "ref-2+boot-delay-500"  # the stream is likely open before the batches are done
        rollout = api.post("/rollouts", json={"to_version": slow}).json()

        followed = _follow(orch, rollout["id"], orch.keys["acme"])
        assert "following the event stream of" in followed.stderr, followed.stderr
        final = json.loads(followed.stdout[followed.stdout.index("{\n"):])
        assert (final["status"], final["upgraded"]) == ("succeeded", 3), followed.stdout
        assert "3 upgraded, 0 failed, 0 remaining" in followed.stdout
        # Each engine's events were printed above the bar, as the stream brought them.
        names = {u: api.get(f"/engines/{u}/events").json()["events"][0]["engine"] for u in "abc"}
        for name in names.values():
            assert f"{name}: upgraded (ref-1 -> {slow})" in followed.stdout, followed.stdout

        # Followed again once it has ended: the stream's history still shows how it went.
        again = _follow(orch, rollout["id"], orch.keys["acme"])
        assert "following the event stream of" in again.stderr, again.stderr
        assert all(f"{name}: upgraded (ref-1 -> {slow})" in again.stdout for name in names.values())

        # Another product's key cannot see the rollout: the database is followed instead.
        refused = _follow(orch, rollout["id"], orch.keys["other"])
        assert "NOT_FOUND" in refused.stderr and "following the database" in refused.stderr
        assert json.loads(refused.stdout[refused.stdout.index("{\n"):])["status"] == "succeeded"
        # No server there: the same.
        gone = _follow(orch, rollout["id"], orch.keys["acme"], "--url", "http://127.0.0.1:9")
        assert "cannot follow http://127.0.0.1:9" in gone.stderr, gone.stderr
        assert json.loads(gone.stdout[gone.stdout.index("{\n"):])["status"] == "succeeded"


def _follow(orch: Orchestrator, rollout_id: int, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**orch.env, "ORCH_PORT": str(orch.port), "ORCH_PLATFORM_KEY": key}
    result = subprocess.run([sys.executable, "-m", "app.cli", "rollout", "status", str(rollout_id),
                             "--follow", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result
