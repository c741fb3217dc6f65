"""The warm pool: a new user's provision or admit claims a booted engine, the pool refills."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.engines import engine_log
from tests.harness import Orchestrator, running, wait_for
from tests.scheduler import service


def warm(orch: Orchestrator, product: str = "acme") -> int:
    out = json.loads(orch.cli("products", "list", "--json").stdout)
    (entry,) = [p for p in out if p["name"] == product]
    return int(entry["warm"])


def pool_product(orch: Orchestrator, size: int, max_engines: int = 100, name: str = "acme") -> None:
    out = orch.cli("products", "create", name, "--max-engines", str(max_engines),
                   "--rate-limit-rpm", "100000", "--warm-pool", str(size))
    created = json.loads(out.stdout)
    assert created["warm_pool"] == size
    orch.keys[name] = created["platform_key"]


def engine_info(url: str, key: str) -> dict[str, object]:
    answer = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {key}"},
                       timeout=5, trust_env=False)
    assert answer.status_code == 200
    result: dict[str, object] = answer.json()
    return result


def test_a_new_user_claims_a_pooled_engine_and_the_pool_refills(tmp_path: Path) -> None:
    with running(tmp_path, "local", product=None) as orch:
        pool_product(orch, 2)
        wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to fill")
        with orch.client("acme") as client:
            assert client.get("/engines").json()["engines"] == []  # pooled engines are not users'
            answer = client.post("/engines/alice/admit", json={"auto_provision": True}).json()
            assert answer["admitted"] and answer["provisioned"] and answer["from_pool"]
            # The engine knew its user before the answer left.
            assert engine_info(answer["url"], answer["api_key"])["user_id"] == "alice"
            assert [e["user_id"] for e in client.get("/engines").json()["engines"]] == ["alice"]
            events = [e["event"] for e in client.get("/engines/alice/events").json()["events"]]
            assert events[-1] == "claimed" and events[0] == "ready"
            again = client.post("/engines/alice/admit", json={}).json()
            assert again["api_key"] == answer["api_key"] and "from_pool" not in again
            provisioned = client.post("/engines/provision", json={"user_id": "bob"}).json()
            assert provisioned["from_pool"] is True and provisioned["status"] == "running"
            assert provisioned["api_key"] != answer["api_key"]
            wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to refill")
            cold = client.post("/engines/provision", json={"user_id": "carol",
                                                           "engine_version": "ref-2"}).json()
            assert cold["from_pool"] is False  # only the default version is pooled


def rows(orch: Orchestrator) -> list[tuple[str, str, str, int, object]]:
    """(user_id, name, status, in_pool, claimed_at) of every engine row."""
    return [(str(u), str(n), str(s), int(p), c) for u, n, s, p, c in
            orch.rows("SELECT user_id, name, status, in_pool, claimed_at FROM engine ORDER BY id")]


def assert_whole(orch: Orchestrator) -> None:
    """No engine half-claimed: pooled rows have a pool id and no claim, users' rows the reverse
    for what they claimed; and no engine process without its row."""
    for user_id, _, _, in_pool, claimed_at in rows(orch):
        assert bool(in_pool) == user_id.startswith("/pool/")
        assert not (in_pool and claimed_at is not None)
    assert_no_leak(orch)


def assert_no_leak(orch: Orchestrator) -> None:
    from app.drivers._process import engines_under

    def same() -> bool:
        return set(engines_under(orch.state_dir / "brains")) == {r[1] for r in rows(orch)}

    wait_for(same, timeout=30, what="every engine process to have its row")


async def _admits(orchs: list[Orchestrator], key: str, users: list[str],
                  per_user: int) -> list[dict[str, Any]]:
    clients = [httpx.AsyncClient(base_url=o.url, headers={"X-Platform-Key": key}, timeout=60,
                                 trust_env=False, limits=httpx.Limits(max_connections=100))
               for o in orchs]
    try:
        calls = [clients[i % len(clients)].post(f"/engines/{user}/admit", json={"auto_provision": True})
                 for i, user in enumerate(u for u in users for _ in range(per_user))]
        random.Random(5).shuffle(calls)
        answers = await asyncio.gather(*calls)
    finally:
        for client in clients:
            await client.aclose()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [a.json() for a in answers]


def test_200_admits_for_50_new_users_on_two_replicas_take_exactly_the_pool(tmp_path: Path) -> None:
    env = {"ORCH_LEASE_S": "5", "ORCH_BOOT_TIMEOUT_S": "30"}
    with running(tmp_path, "local", product=None, env=env, ports=80) as first:
        pool_product(first, 10, max_engines=60)
        second = first.replica()
        try:
            wait_for(lambda: warm(first) == 10, timeout=60, what="the pool to fill")
            most = [0]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    most[0] = max(most[0], len(rows(first)))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            users = [f"user-{i}" for i in range(50)]
            try:
                answers = asyncio.run(_admits([first, second], first.keys["acme"], users, 4))
            finally:
                sampling.set()
                sampler.join()
            by_user: dict[str, list[dict[str, Any]]] = {}
            for answer in answers:
                assert answer["admitted"], answer
                by_user.setdefault(answer["user_id"], []).append(answer)
            assert sorted(by_user) == sorted(users)
            pooled = [u for u, a in by_user.items() if any(x.get("from_pool") for x in a)]
            assert len(pooled) == 10
            for user, got in by_user.items():  # one engine and one key per user, seen by all
                assert len({(a["url"], a["api_key"]) for a in got}) == 1, user
            engines = {(a[0]["url"], a[0]["api_key"]) for a in by_user.values()}
            assert len({u for u, _ in engines}) == len({k for _, k in engines}) == 50
            for user, got in by_user.items():  # each brain its user's alone
                url, key = got[0]["url"], got[0]["api_key"]
                assert engine_info(url, key)["user_id"] == user
                put = httpx.put(f"{url}/v1/memory/owner", content=user.encode(),
                                headers={"Authorization": f"Bearer {key}"}, trust_env=False)
                assert put.status_code == 200
            for user, got in by_user.items():
                owner = httpx.get(f"{got[0]['url']}/v1/memory/owner", trust_env=False,
                                  headers={"Authorization": f"Bearer {got[0]['api_key']}"})
                assert owner.content == user.encode()
            wait_for(lambda: warm(first) == 10, timeout=60, what="the pool to refill")
            assert most[0] <= 60 and len(rows(first)) == 60
            assert_whole(first)
        finally:
            second.kill()


def test_a_sigkill_mid_claim_leaves_the_claim_settled_and_the_pool_whole(tmp_path: Path) -> None:
    # The engines take 1.5 s to say they know their user, so the claim is cut there; and they
    # forget a call whose caller left, so alice's engine knows her only if recovery tells it.
    env = {"ORCH_LEASE_S": "2",
           "ORCH_ENGINE_IMAGE": "ref+identity-delay-1500+identity-drop-unheard"}
    with running(tmp_path, "local", product=None, env=env) as orch:
        pool_product(orch, 2)
        wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to fill")
        client = orch.client("acme", timeout=10)
        admit = threading.Thread(target=_swallow, args=(client, "/engines/alice/admit"))
        admit.start()
        wait_for(lambda: _logged(orch, "alice", "holding an identity call for 'alice'"),
                 timeout=10, what="the claim's identity call to reach the engine")
        orch.kill()
        admit.join()
        client.close()
        wait_for(lambda: _logged(orch, "alice", "dropped an identity call for 'alice'"),
                 timeout=10, what="the engine to drop the cut claim's call")
        orch.start()
        wait_for(lambda: (orch.engine_row("alice") or {}).get("status") == "running",
                 timeout=30, what="the cut claim to be settled")
        assert "claimed by user 'alice'" in engine_log(orch, "alice")
        with orch.client("acme") as client:
            answer = client.post("/engines/alice/admit", json={}).json()
            assert answer["admitted"]
            assert engine_info(answer["url"], answer["api_key"])["user_id"] == "alice"
        wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to refill")
        assert_whole(orch)


def test_a_sigkill_mid_refill_leaves_no_engine_behind_and_the_pool_recovers(tmp_path: Path) -> None:
    env = {"ORCH_LEASE_S": "2", "ORCH_ENGINE_IMAGE": "ref+boot-delay-1500"}
    with running(tmp_path, "local", product=None, env=env) as orch:
        pool_product(orch, 3)
        wait_for(lambda: sum(1 for r in rows(orch) if r[2] == "provisioning") == 3
                 and all(json.loads(s or "{}").get("pid")
                         for (s,) in orch.rows("SELECT driver_state FROM engine")),
                 timeout=30, what="the refill to be booting")
        orch.kill()
        orch.start()
        wait_for(lambda: warm(orch) == 3, timeout=60, what="the pool to recover")
        assert_whole(orch)
        with orch.client("acme") as client:
            assert client.post("/engines/bob/admit", json={"auto_provision": True}).json()["from_pool"]


def _logged(orch: Orchestrator, user_id: str, line: str) -> bool:
    return orch.engine_row(user_id) is not None and line in engine_log(orch, user_id)


def _swallow(client: httpx.Client, path: str) -> None:
    try:
        client.post(path, json={"auto_provision": True})
    except httpx.HTTPError:
        pass  # the orchestrator was killed under it


def test_a_failed_pooled_engine_and_a_rollout_replace_pooled_engines(tmp_path: Path) -> None:
    with running(tmp_path, "local", product=None) as orch:
        pool_product(orch, 2)
        wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to fill")
        first = {r[1] for r in rows(orch)}
        pid = json.loads(orch.rows("SELECT driver_state FROM engine")[0][0])["pid"]
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: warm(orch) == 2 and len(first & {r[1] for r in rows(orch)}) == 1,
                 timeout=30, what="the failed engine to be replaced")
        with orch.client("acme") as client:
            rollout = client.post("/rollouts", json={"to_version": "ref-2"}).json()
            assert rollout["status"] == "running"
            # One read: `warm` counts ready rows of any version, so read apart from the
            # versions it could count the old rows while the new ones still boot.
            wait_for(lambda: orch.rows(
                "SELECT engine_version, status, lease_owner FROM engine WHERE in_pool")
                == [("ref-2", "running", None)] * 2, timeout=30,
                what="the pool to move to the new version")
            assert warm(orch) == 2
            answer = client.post("/engines/carol/admit", json={"auto_provision": True}).json()
            assert answer["from_pool"] and answer["engine_version"] == "ref-2"
        assert_whole(orch)


def test_in_pause_mode_pooled_engines_wait_paused_and_are_resumed_at_claim(tmp_path: Path) -> None:
    env = {"ORCH_SLEEP_MODE": "pause", "ORCH_IDLE_SLEEP_S": "0.5"}
    with running(tmp_path, "local", product=None, env=env) as orch:
        pool_product(orch, 1)
        wait_for(lambda: [r[2] for r in rows(orch)] == ["sleeping"], timeout=30,
                 what="the pooled engine to be paused")
        pid = json.loads(orch.rows("SELECT driver_state FROM engine")[0][0])["pid"]
        # The row is `sleeping` before SIGSTOP is sent, and a busy machine delivers it late.
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 timeout=10, what="the pooled engine's process to be stopped")
        with orch.client("acme") as client:
            answer = client.post("/engines/dave/admit", json={"auto_provision": True}).json()
            assert answer["from_pool"] and answer["status"] == "running"
            assert engine_info(answer["url"], answer["api_key"])["user_id"] == "dave"


def test_on_nomad_the_pool_keeps_volumes_and_jobs_and_a_claim_names_its_user_in_place(
        tmp_path: Path) -> None:
    with running(tmp_path, "nomad", product=None) as orch:
        nomad, consul = orch.env["NOMAD_ADDR"], orch.env["CONSUL_HTTP_ADDR"]
        pool_product(orch, 2)
        wait_for(lambda: warm(orch) == 2, timeout=60, what="the pool to fill")
        names = {r[1] for r in rows(orch)}
        volumes = httpx.get(f"{nomad}/v1/volumes?type=host", trust_env=False).json()
        assert names <= {v["Name"] for v in volumes}
        assert names <= {j["ID"] for j in httpx.get(f"{nomad}/v1/jobs", trust_env=False).json()}
        with orch.client("acme") as client:
            answer = client.post("/engines/Alice%20Smith/admit", json={"auto_provision": True}).json()
            assert answer["from_pool"]
            pid = engine_info(answer["url"], answer["api_key"])["pid"]
            assert engine_info(answer["url"], answer["api_key"])["user_id"] == "Alice Smith"
            (name,) = [r[1] for r in rows(orch) if r[0] == "Alice Smith"]

            def named() -> bool:
                entries = service(consul, name)
                return len(entries) == 1 and entries[0]["Service"]["Meta"]["user_id"] == "Alice Smith" \
                    and "user-Alice Smith" in entries[0]["Service"]["Tags"]

            wait_for(named, timeout=10, what="the Consul service to name the user")
            allocs = httpx.get(f"{nomad}/v1/job/{name}/allocations", trust_env=False).json()
            assert [a["ClientStatus"] for a in allocs] == ["running"]  # updated, not replaced
            assert engine_info(answer["url"], answer["api_key"])["pid"] == pid
            assert all(c["Status"] == "passing" for c in service(consul, name)[0]["Checks"])
            wait_for(lambda: warm(orch) == 2, timeout=60, what="the pool to refill")


def test_admit_without_waiting_answers_a_claim_at_once(tmp_path: Path) -> None:
    with running(tmp_path, "local", product=None) as orch:
        pool_product(orch, 1)
        wait_for(lambda: warm(orch) == 1, timeout=30, what="the pool to fill")
        with orch.client("acme") as client:
            answer = client.post("/engines/erin/admit", json={"auto_provision": True,
                                                             "wait": False}).json()
            assert answer["admitted"] and answer["from_pool"] and answer["provisioned"]
            cold = client.post("/engines/fred/admit", json={"auto_provision": True,
                                                           "wait": False}).json()
            assert cold == {"admitted": False, "reason": "engine_starting", "status": "provisioning"}


def test_at_the_quota_a_new_user_waits_for_a_booting_pooled_engine_rather_than_a_429(
        tmp_path: Path) -> None:
    env = {"ORCH_ENGINE_IMAGE": "ref+boot-delay-1000"}
    with running(tmp_path, "local", product=None, env=env) as orch:
        pool_product(orch, 2, max_engines=2)
        wait_for(lambda: [r[2] for r in rows(orch)] == ["provisioning"] * 2, timeout=30,
                 what="the pool to be booting")
        with orch.client("acme") as client:
            answer = client.post("/engines/gina/admit", json={"auto_provision": True})
            assert answer.status_code == 200 and answer.json()["from_pool"], answer.text
            assert client.post("/engines/hal/admit", json={"auto_provision": True}).json()["from_pool"]
            refused = client.post("/engines/ivy/admit", json={"auto_provision": True})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "QUOTA_EXCEEDED"
        assert len(rows(orch)) == 2
