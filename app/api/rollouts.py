"""The rollout endpoints: start, list, look up, pause, resume, abort. The rollouts
themselves are driven by app/rollouts.py on the replica holding each one's lease."""

from __future__ import annotations

from typing import Any, cast

from msgspec import UNSET

from app import errors, registry
from app.api import follow, spec
from app.api.handlers import Call, Handler, Services, decode_cursor, encode_cursor, event_struct, iso
from app.registry.models import Rollout

rollouts = registry.rollouts
FINISHED = ("succeeded", "failed", "rolled_back", "aborted")


async def start_rollout(svc: Services, call: Call) -> Any:
    body: spec.RolloutBody = call.body
    from_version = None if body.from_version is UNSET else body.from_version
    for version in (body.to_version, from_version):
        if version is not None and not version.isprintable():
            raise errors.invalid("versions must be 1 to 256 printable characters")
    svc.lifecycle.driver.check_version(body.to_version)
    made = rollouts.create_rollout(call.product.id, body.to_version, from_version,
                                   body.batch_size, body.max_failures)
    return rollout_struct(made)


async def list_rollouts(svc: Services, call: Call) -> Any:
    return spec.RolloutPage([rollout_struct(r) for r in rollouts.list_rollouts(call.product.id)])


async def get_rollout(svc: Services, call: Call) -> Any:
    return rollout_struct(_find(call))


async def pause(svc: Services, call: Call) -> Any:
    return _move(call, ("running",), "paused", same="paused")


async def resume(svc: Services, call: Call) -> Any:
    return _move(call, ("paused",), "running", same="running")


async def abort(svc: Services, call: Call) -> Any:
    return _move(call, ("running", "paused"), "aborted", same="aborted")


async def rollout_events(svc: Services, call: Call) -> Any:
    """The rollout's engines' audit events since it started; a stream with follow=true."""
    rollout = _find(call)
    query: spec.EventsQuery = call.query
    if query.follow:
        if query.cursor is not UNSET:
            raise errors.invalid("cursor does not go with follow=true")
        return follow.follow(lambda n: rollouts.rollout_events_page(rollout, None, n),
                             lambda last: rollouts.rollout_events_after(rollout, last),
                             query.limit, event_struct)
    before = None if query.cursor is UNSET else decode_cursor(query.cursor)
    rows = rollouts.rollout_events_page(rollout, before, query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return spec.EventPage([event_struct(e) for e in rows],
                          encode_cursor(rows[-1].id) if more else None)


HANDLERS: dict[str, Handler] = {
    "start_rollout": start_rollout, "rollouts": list_rollouts, "rollout": get_rollout,
    "pause_rollout": pause, "resume_rollout": resume, "abort_rollout": abort,
    "rollout_events": rollout_events,
}


def _find(call: Call) -> Rollout:
    found = rollouts.get_rollout(call.product.id, call.rollout_id)
    if found is None:
        raise errors.RolloutNotFound(f"no rollout {call.rollout_id} for this product")
    return found


def _move(call: Call, sources: tuple[str, ...], target: str, same: str) -> spec.Rollout:
    """A compare-and-set of the status; asking for the status it has is answered as is."""
    rollout = _find(call)
    if rollout.status != same and not rollouts.set_status(rollout, sources, target):
        rollout = _find(call)
        if rollout.status != same:
            raise errors.RolloutFinished(f"rollout {rollout.id} is {rollout.status}")
    return rollout_struct(_find(call))


def rollout_struct(rollout: Rollout) -> spec.Rollout:
    counts = rollouts.summary(rollout.id)
    return spec.Rollout(
        id=rollout.id, status=cast(spec.RolloutStatus, rollout.status), to_version=rollout.to_version,
        from_version=rollout.from_version, batch_size=rollout.batch_size,
        max_failures=rollout.max_failures, total=counts["total"], upgraded=counts["upgraded"],
        failed=counts["failed"], created_at=iso(rollout.created_at),
        updated_at=iso(rollout.updated_at),
        failures=[spec.RolloutFailure(**f) for f in counts["failures"]])
