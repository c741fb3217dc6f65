"""Keys at rest, file modes, odd user ids, and what error bodies never contain."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

import pytest

from tests.harness import Orchestrator


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


def test_files_are_private(orch: Orchestrator) -> None:
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
