"""Keys at rest, file modes, odd user ids, and what error bodies never contain."""

from __future__ import annotations

import hmac
import json
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    OWN_USER,
    ROOT,
    SYSTEM_PYTHON,
    Orchestrator,
    passable_tmp,
    reachable_refengine,
    running,
)


def every_stored_value(orch: Orchestrator) -> str:
    """All rows of all tables as text, plus the raw SQLite files when that is the database."""
    text = []
    for table in ("product", "engine", "event", "rate_limit", "port_lease"):
        text += [repr(row) for row in orch.rows(f"SELECT * FROM {table}")]
    if not orch.pg_url:
        for path in orch.state_dir.glob("orch.db*"):
            text.append(path.read_bytes().decode("latin-1"))
    return "\n".join(text)


def test_keys_are_not_stored_in_plain_text(orch: Orchestrator) -> None:
    api = orch.client("acme")
    first = api.post("/engines/provision", json={"user_id": "vault"}).json()["api_key"]
    second = api.post("/engines/vault/rotate-key").json()["api_key"]
    stored = every_stored_value(orch)
    for secret in (first, second, orch.keys["acme"]):
        assert secret not in stored
    assert orch.keys["acme"][:12] not in stored


def test_files_are_private(own_orch: Orchestrator) -> None:
    orch = own_orch
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "modes"})
    name = orch.rows("SELECT name FROM engine")[0][0]
    brain = orch.state_dir / "brains" / name
    assert stat.S_IMODE(brain.stat().st_mode) == 0o700
    assert stat.S_IMODE((orch.state_dir / "run" / name / "api_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((orch.state_dir / "secret.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("user_id", ["..", ".", "...", "ü", "CON", " lead", "a\\b", "~root", "$HOME"])
def test_odd_user_ids_stay_inside_the_brain_root(orch: Orchestrator, user_id: str) -> None:
    api = orch.client("acme")
    # Every byte percent-encoded: clients drop "." and ".." path segments otherwise.
    quoted = "".join(f"%{b:02X}" for b in user_id.encode())
    response = api.post("/engines/provision", json={"user_id": user_id})
    assert response.status_code == 200, response.text
    brains = orch.state_dir / "brains"
    entries = list(brains.iterdir())
    assert len(entries) == 1 and entries[0].parent == brains
    assert entries[0].name.startswith("e-acme-")
    got = api.get(f"/engines/{quoted}")
    assert got.status_code == 200 and got.json()["user_id"] == user_id
    assert api.delete(f"/engines/{quoted}").status_code == 200
    assert list(brains.iterdir()) == []
    # nothing anywhere else in the state dir but what the orchestrator itself keeps
    assert {p.name for p in orch.state_dir.iterdir()} <= {"brains", "run", "secret.key", "orch.db",
                                                          "orch.db-wal", "orch.db-shm"}


def test_error_bodies_never_echo_a_key(orch: Orchestrator) -> None:
    import httpx

    probe = "orch_pk_" + "s" * 43
    response = httpx.get(orch.url + "/engines", headers={"X-Platform-Key": probe}, trust_env=False)
    assert response.status_code == 401 and probe not in response.text
    api = orch.client("acme")
    bad = api.post("/engines/provision", content=b'{"user_id": "eng_secretlooking/xx"}')
    assert bad.status_code == 400 and "eng_secret" not in bad.json()["error"]["message"]


def test_platform_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app import crypto, products, registry
    from app.api.auth import Authenticator

    registry.connect(f"sqlite:///{tmp_path / 'k.db'}")
    _, key = products.create("ct")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(crypto.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert Authenticator().product(key).name == "ct"
    assert calls  # the final comparison went through hmac.compare_digest
    registry.db.close()


# ---- engines are tenants too ------------------------------------------------------------------


def engine_pid(orch: Orchestrator, user_id: str) -> int:
    row = orch.engine_row(user_id)
    assert row is not None
    return int(json.loads(row["driver_state"])["pid"])


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


def proc_ids(pid: int) -> dict[str, list[int]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


def test_engines_get_only_the_allowed_environment(tmp_path: Path) -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "aws-leak", "PGPASSWORD": "pg-leak", "TZ": "Europe/Paris",
           "LANG": "C.UTF-8", "ORCH_ENGINE_ENV": "TZ"}
    with running(tmp_path, env=env) as orch:
        orch.client("acme").post("/engines/provision", json={"user_id": "env"})
        got = proc_environ(engine_pid(orch, "env"))
    assert set(got) == {"PATH", "HOME", "LANG", "TZ", "ENGINE_PORT", "ENGINE_HOST",
                        "ENGINE_BRAIN_DIR", "ENGINE_API_KEY_FILE", "ENGINE_USER_ID",
                        "ENGINE_VERSION"}
    assert got["TZ"] == "Europe/Paris" and got["HOME"] == got["ENGINE_BRAIN_DIR"]
    assert "aws-leak" not in repr(got) and "pg-leak" not in repr(got)


@pytest.fixture
def own_orch(tmp_path: Path) -> Iterator[Orchestrator]:
    """Engines as ourselves, whatever ORCH_TEST_ENGINE_USER says: modes are then all 0700/0600."""
    with running(tmp_path, env={"ORCH_ENGINE_USER": OWN_USER}) as orch:
        yield orch


def test_everything_written_is_private_whatever_the_umask(own_orch: Orchestrator) -> None:
    orch = own_orch
    os.chmod(orch.state_dir, 0o755)  # as an older version left them
    os.chmod(orch.state_dir / "orch.db", 0o644)
    os.chmod(orch.state_dir / "secret.key", 0o644)
    old = os.umask(0o022)  # the orchestrator inherits a permissive umask
    try:
        orch.restart()
    finally:
        os.umask(old)
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "modes"})
    name = orch.rows("SELECT name FROM engine")[0][0]
    state = orch.state_dir
    dirs = [state, state / "brains", state / "run", state / "brains" / name, state / "run" / name]
    files = [state / "orch.db", state / "orch.db-wal", state / "orch.db-shm", state / "secret.key",
             state / "run" / name / "api_key", state / "run" / name / "engine.log"]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs + files} == {
        **{str(p): "0o700" for p in dirs}, **{str(p): "0o600" for p in files}}


@pytest.fixture
def as_nobody() -> Iterator[Path]:
    with passable_tmp("orch-nobody-") as base:
        yield base


ATTACK = r"""
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path) and not path.startswith("/proc/"):
            os.listdir(path)
        elif path.endswith("/cwd"):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        out[path] = "read"
    except OSError as exc:
        out[path] = type(exc).__name__
print(json.dumps(out))
"""


def attempt(paths: list[Path], uid: int, gid: int) -> dict[str, str]:
    """Read each path with an engine's exact credentials (uid, gid, no other groups)."""
    result = subprocess.run([str(SYSTEM_PYTHON), "-I", "-c", ATTACK, *map(str, paths)], user=uid,
                            group=gid, extra_groups=[], capture_output=True, text=True,
                            timeout=30, check=True)
    return dict(json.loads(result.stdout))


def test_engines_run_as_nobody_and_reach_only_their_own_files(as_nobody: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    # ORCH_ENGINE_USER unset: a root orchestrator's default. Our venv's interpreter may sit
    # where `nobody` cannot go (here: /root/.pyenv); the reference engine runs by path anywhere.
    env = {"ORCH_ENGINE_USER": "", "ORCH_ENGINE_CMD": f"{SYSTEM_PYTHON} {reachable_refengine(as_nobody)}"}
    with running(as_nobody, env=env) as orch:
        api = orch.client("acme")
        keys = {u: api.post("/engines/provision", json={"user_id": u}).json()["api_key"]
                for u in ("alice", "bob")}
        urls = {u: api.get(f"/engines/{u}").json()["url"] for u in keys}
        for user, key in keys.items():  # each writes a value into its brain
            put = httpx.put(f"{urls[user]}/v1/memory/secret", content=user.encode(),
                            headers={"Authorization": f"Bearer {key}"}, trust_env=False)
            assert put.status_code < 300, put.text
        pids = {u: engine_pid(orch, u) for u in keys}
        ids = {u: proc_ids(pid) for u, pid in pids.items()}
        for user in keys:
            assert ids[user]["Uid"] == [nobody] * 4 and ids[user]["Groups"] == []
        assert ids["alice"]["Gid"][0] != ids["bob"]["Gid"][0]  # a group of its own each

        names = {u: orch.engine_row(u)["name"] for u in keys}  # type: ignore[index]
        state = orch.state_dir
        own, other = names["alice"], names["bob"]
        forbidden = [state / "secret.key", state / "orch.db", state / "orch.db-wal", state,
                     state / "brains", state / "run", state / "brains" / other,
                     state / "run" / other / "api_key", state / "run" / other / "engine.log",
                     state / "run" / own / "engine.log",
                     Path(f"/proc/{pids['bob']}/environ"), Path(f"/proc/{pids['bob']}/cwd")]
        forbidden += list((state / "brains" / other).iterdir())
        allowed = [state / "brains" / own, state / "run" / own / "api_key"]
        got = attempt(forbidden + allowed, nobody, ids["alice"]["Gid"][0])
        assert {p: got[str(p)] for p in allowed} == {p: "read" for p in allowed}
        assert {p: got[str(p)] for p in forbidden} == {p: "PermissionError" for p in forbidden}

        # ours alone, or its group's (root-owned, so no engine owns another's by uid)
        gid = ids["alice"]["Gid"][0]
        expected = {state: (0, 0, 0o711), state / "brains": (0, 0, 0o711),
                    state / "run": (0, 0, 0o711), state / "secret.key": (0, 0, 0o600),
                    state / "orch.db": (0, 0, 0o600), state / "orch.db-wal": (0, 0, 0o600),
                    state / "brains" / own: (0, gid, 0o2770), state / "run" / own: (0, gid, 0o750),
                    state / "run" / own / "api_key": (0, gid, 0o640),
                    state / "run" / own / "engine.log": (0, 0, 0o600)}
        found = {p: (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
                 for p in expected}
        assert found == expected

        # the engine still uses its brain and key: rotation, stop/start keep working
        new_key = api.post("/engines/alice/rotate-key").json()["api_key"]
        assert api.post("/engines/alice/stop").status_code == 200
        assert api.post("/engines/alice/start").status_code == 200
        url = api.get("/engines/alice").json()["url"]
        got_back = httpx.get(f"{url}/v1/memory/secret", trust_env=False,
                             headers={"Authorization": f"Bearer {new_key}"})
        assert got_back.status_code == 200 and got_back.text == "alice"


def test_a_brain_left_by_a_root_engine_is_handed_to_nobody(as_nobody: Path) -> None:
    """Upgrading a root-run deployment: the brain's files become the engine's, nothing lost."""
    with running(as_nobody, env={"ORCH_ENGINE_USER": "root"}) as orch:
        api = orch.client("acme")
        key = api.post("/engines/provision", json={"user_id": "old"}).json()["api_key"]
        url = api.get("/engines/old").json()["url"]
        bearer = {"Authorization": f"Bearer {key}"}
        httpx.put(f"{url}/v1/memory/kept", content=b"yes", headers=bearer, trust_env=False)
        assert api.post("/engines/old/stop").status_code == 200
        orch.env.update(ORCH_ENGINE_USER="",
                        ORCH_ENGINE_CMD=f"{SYSTEM_PYTHON} {reachable_refengine(as_nobody)}")
        orch.restart()
        api = orch.client("acme")
        assert api.post("/engines/old/start").status_code == 200
        assert proc_ids(engine_pid(orch, "old"))["Uid"][0] == pwd.getpwnam("nobody").pw_uid
        url = api.get("/engines/old").json()["url"]
        got = httpx.get(f"{url}/v1/memory/kept", headers=bearer, trust_env=False)
        assert got.status_code == 200 and got.content == b"yes"


def test_serve_refuses_engines_that_could_not_run(as_nobody: Path) -> None:
    """Run as root, engines run as nobody: a state dir or an engine command nobody cannot
    reach stops start-up with one line, rather than failing every provision later."""
    private = as_nobody / "private"
    private.mkdir(mode=0o700)
    engine = private / "engine.sh"
    engine.write_text("#!/bin/sh\nexit 0\n")
    engine.chmod(0o755)
    ok_state = as_nobody / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "NOMAD_", "CONSUL_"))}
    for extra, needle in [({"ORCH_STATE_DIR": str(ok_state), "ORCH_ENGINE_CMD": str(engine)},
                           f"({private} is mode 700)"),
                          ({"ORCH_STATE_DIR": str(private / "state")},
                           f"({private} is mode 700)")]:
        result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0"],
                                env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("orch: engines run as uid ") and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
