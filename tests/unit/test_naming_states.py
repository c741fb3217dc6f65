from __future__ import annotations

import re

import pytest

from app import states
from app.naming import engine_name, user_id_problem


@pytest.mark.parametrize("user_id", ["alice", "Alice", "a.b", "a-b", "a b", "../..", "ü" * 128,
                                      "x" * 128, "🙂", "-", "user@example.com"])
def test_engine_names_are_valid_labels(user_id: str) -> None:
    name = engine_name("some-product-with-a-long-name", user_id)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and len(name) <= 63
    assert name == engine_name("some-product-with-a-long-name", user_id)  # stable


def test_engine_names_do_not_collide() -> None:
    users = ["alice", "Alice", "ALICE", "a.lice", "a-lice", "a_lice", "alice ", "alice."]
    names = {engine_name("p", u) for u in users}
    assert len(names) == len(users)
    assert engine_name("p1", "alice") != engine_name("p2", "alice")


@pytest.mark.parametrize("user_id,ok", [
    ("alice", True), ("x" * 128, True), ("ünï cödé", True), ("a b", True),
    ("", False), ("x" * 129, False), ("a/b", False), ("a\x00b", False), ("a\nb", False),
    (5, False), (None, False),
])
def test_user_id_rules(user_id: object, ok: bool) -> None:
    assert (user_id_problem(user_id) is None) is ok


def test_state_table() -> None:
    assert states.next_state(None, "provision") == states.PROVISIONING
    assert states.next_state(states.STARTING, "ready") == states.RUNNING
    assert states.next_state(states.RUNNING, "sleep") == states.SLEEPING
    for src in (states.SLEEPING, states.STOPPED, states.FAILED):
        assert states.next_state(src, "start") == states.STARTING
    for src in states.STATES:
        assert states.next_state(src, "destroy") == states.DESTROYING
    with pytest.raises(states.IllegalTransition):
        states.next_state(states.STOPPED, "sleep")
    with pytest.raises(states.IllegalTransition):
        states.next_state(states.RUNNING, "start")
    assert states.is_valid_path([None, "provisioning", "running", "sleeping", "starting",
                                 "running", "stopping", "stopped", "destroying"])
    assert not states.is_valid_path([None, "running"])
