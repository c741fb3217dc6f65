"""A re-provisioned user's events say which engine each belongs to. Each event carries
`engine`, the engine's name, derived from (product, user_id) alone, so a destroyed engine and
its successor share it; and `engine_id`, which is never reused, so they do not."""

from __future__ import annotations

from tests.harness import Orchestrator


def trail(orch: Orchestrator, user_id: str) -> list[dict[str, object]]:
    """The whole trail, oldest first, read page by page along `next_cursor`."""
    api = orch.client("acme")
    events: list[dict[str, object]] = []
    params: dict[str, object] = {"limit": 2}
    while True:
        page = api.get(f"/engines/{user_id}/events", params=params).json()
        events += page["events"]
        if page["next_cursor"] is None:
            return events[::-1]
        params = {"limit": 2, "cursor": page["next_cursor"]}


def two_lives(orch: Orchestrator) -> list[dict[str, object]]:
    api = orch.client("acme")
    for _ in range(2):
        assert api.post("/engines/provision", json={"user_id": "again"}).status_code == 200
        assert api.delete("/engines/again").status_code == 200
    return trail(orch, "again")


def test_paging_reads_the_whole_trail_once(orch: Orchestrator) -> None:
    events = two_lives(orch)
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))  # no event twice, oldest first
    assert [e["event"] for e in events] == ["provision", "ready", "destroy", "destroyed"] * 2


def test_each_engine_of_a_user_has_its_own_marker(orch: Orchestrator) -> None:
    events = two_lives(orch)
    first, second = events[:4], events[4:]

    def marker(event: dict[str, object]) -> tuple[object, object]:
        # `engine` made distinct, or an `engine_id` beside it: either fix passes
        return event["engine"], event.get("engine_id")
    assert len({marker(e) for e in first}) == 1 and len({marker(e) for e in second}) == 1
    assert marker(first[0]) != marker(second[0])
