"""What the API answers, as frozen dataclasses.

Timestamps become timezone-aware `datetime`s (UTC), since comparing and formatting them is
what callers do with them. Keys the client does not know (from a newer server) are ignored;
a missing required key raises KeyError, which the client reports as UnexpectedResponse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The engine states of the spec, for comparisons; `Engine.status` stays a plain str so that a
# state added by a newer server does not break an older client.
PROVISIONING, STARTING, RUNNING, STOPPING = "provisioning", "starting", "running", "stopping"
STOPPED, SLEEPING, FAILED, DESTROYING = "stopped", "sleeping", "failed", "destroying"


@dataclass(frozen=True)
class Engine:
    user_id: str
    status: str
    url: str | None  # None whenever nothing listens (stopped, failed, ...)
    engine_version: str
    created_at: datetime
    updated_at: datetime
    last_admit_at: datetime | None
    restarts: int  # automatic restarts in a row
    failure_reason: str | None  # boot_timeout, crashed, unhealthy, ... when failed

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Engine:
        return cls(
            user_id=data["user_id"],
            status=data["status"],
            url=data.get("url"),
            engine_version=data["engine_version"],
            created_at=parse_time(data["created_at"]),
            updated_at=parse_time(data["updated_at"]),
            last_admit_at=parse_optional_time(data.get("last_admit_at")),
            restarts=int(data.get("restarts", 0)),
            failure_reason=data.get("failure_reason"),
        )


@dataclass(frozen=True)
class Snapshot:
    """A copy of an engine's brain in the snapshot store."""

    id: str
    created_at: datetime
    size_bytes: int
    files: int
    engine_version: str
    consistent: bool  # False: copied while the engine ran without a checkpoint

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(id=data["id"], created_at=parse_time(data["created_at"]),
                   size_bytes=int(data["size_bytes"]), files=int(data["files"]),
                   engine_version=data["engine_version"], consistent=bool(data["consistent"]))


@dataclass(frozen=True)
class SnapshotPage:
    snapshots: tuple[Snapshot, ...]  # newest first
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SnapshotPage:
        return cls(tuple(Snapshot.from_json(s) for s in data["snapshots"]), data.get("next_cursor"))


@dataclass(frozen=True)
class ProvisionedEngine:
    """The answer of provision and rotate-key: the engine and its key, shown this one time."""

    engine: Engine
    api_key: str
    from_pool: bool = False  # provision: the engine came booted from the warm pool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProvisionedEngine:
        return cls(engine=Engine.from_json(data), api_key=data["api_key"],
                   from_pool=bool(data.get("from_pool", False)))


@dataclass(frozen=True)
class Admission:
    """The answer of admit. When `admitted`, `url` and `api_key` are set; when not, `reason`
    says why (`engine_not_found`, `engine_sleeping`, `engine_stopped`, `engine_unhealthy`,
    `engine_starting`: with `wait=False`, provisioning or starting)."""

    admitted: bool
    user_id: str  # the server omits it on a denial; the client fills in the one it asked about
    status: str | None  # None when there is no engine
    reason: str | None = None
    url: str | None = None
    api_key: str | None = None
    engine_version: str | None = None
    provisioned: bool = False  # this admit created the engine (or waited on its creation)
    woken: bool = False  # this admit woke a sleeping engine (or waited on the wake)
    from_pool: bool = False  # the engine it provisioned came booted from the warm pool

    @classmethod
    def from_json(cls, data: Mapping[str, Any], user_id: str) -> Admission:
        return cls(
            admitted=bool(data["admitted"]),
            user_id=data.get("user_id") or user_id,
            status=data.get("status"),
            reason=data.get("reason"),
            url=data.get("url"),
            api_key=data.get("api_key"),
            engine_version=data.get("engine_version"),
            provisioned=bool(data.get("provisioned", False)),
            woken=bool(data.get("woken", False)),
            from_pool=bool(data.get("from_pool", False)),
        )


@dataclass(frozen=True)
class EnginePage:
    """One page of `list`; pass `next_cursor` back for the next (None: this was the last)."""

    engines: tuple[Engine, ...]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EnginePage:
        return cls(engines=tuple(Engine.from_json(e) for e in data["engines"]),
                   next_cursor=data.get("next_cursor"))


@dataclass(frozen=True)
class Event:
    """One audit event of an engine (kept after destroy)."""

    id: int
    at: datetime
    engine: str  # the engine's name: the same for every engine the user has had
    engine_id: int | None  # which of them: never reused (None: recorded before ids were kept)
    event: str  # provision, ready, stop, stopped, start, rotate_key, destroy, destroyed, ...
    from_status: str | None  # "from" in the JSON, a Python keyword
    to_status: str | None  # "to" in the JSON
    reason: str | None
    request_id: str | None  # the request that caused it, when one did

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(id=int(data["id"]), at=parse_time(data["at"]), engine=data["engine"],
                   engine_id=data.get("engine_id"), event=data["event"],
                   from_status=data.get("from"), to_status=data.get("to"),
                   reason=data.get("reason"), request_id=data.get("request_id"))


@dataclass(frozen=True)
class EventPage:
    """One page of `events`, newest first; pass `next_cursor` back for older ones."""

    events: tuple[Event, ...]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EventPage:
        return cls(events=tuple(Event.from_json(e) for e in data["events"]),
                   next_cursor=data.get("next_cursor"))


@dataclass(frozen=True)
class Rollout:
    """A rollout of a new engine_version across the product's engines."""

    id: int
    status: str  # running, paused, succeeded, failed, rolled_back, aborted
    to_version: str
    from_version: str | None
    batch_size: int
    max_failures: int
    total: int
    upgraded: int
    failed: int
    created_at: datetime
    updated_at: datetime
    failures: tuple[tuple[str, str], ...]  # (user_id, reason)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        return cls(id=int(data["id"]), status=data["status"], to_version=data["to_version"],
                   from_version=data.get("from_version"), batch_size=int(data["batch_size"]),
                   max_failures=int(data["max_failures"]), total=int(data["total"]),
                   upgraded=int(data["upgraded"]), failed=int(data["failed"]),
                   created_at=parse_time(data["created_at"]),
                   updated_at=parse_time(data["updated_at"]),
                   failures=tuple((f["user_id"], f["reason"]) for f in data["failures"]))


@dataclass(frozen=True)
class Health:
    """The answer of /healthz or /readyz. `ok` is False when /readyz answers 503."""

    ok: bool
    status: str  # "ok", "ready" or "unavailable"
    reason: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], ok: bool) -> Health:
        return cls(ok=ok, status=str(data.get("status", "")), reason=data.get("reason"))


def parse_time(value: str) -> datetime:
    # The server writes "2024-05-01T12:00:00.123Z"; Python 3.11 reads the "Z" itself.
    return datetime.fromisoformat(value)


def parse_optional_time(value: str | None) -> datetime | None:
    return None if value is None else parse_time(value)
