"""The endpoint table: the one description of the HTTP API.

Every operation is one `Endpoint`: method, path, query and body types, answer type and the
error codes it can give. The server's routes and request validation (app/api/app.py), the
OpenAPI document (app/api/openapi.py) and the Python client (app/client/_calls.py) are all
derived from it; tests/unit/test_api_table.py fails when any of them disagrees with it.

This module imports nothing of the server but the table of error codes (app.errors, standard
library only), so the client can import it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from app.errors import STATUS_BY_CODE as STATUS_BY_CODE  # the statuses, for the OpenAPI document

# ---- the error codes each call can answer (their statuses: the table, app.errors.CODES) ------

# Every authenticated call can meet these: bad input, a bad key, and the database (or, for
# the calls that reach it, the scheduler) being out of reach.
COMMON_ERRORS = ("INVALID_REQUEST", "UNAUTHORIZED", "SCHEDULER_UNAVAILABLE")
# Every call, with a key or not, can meet the HTTP edge's refusals (app/api/edge.py).
EDGE_ERRORS = ("REQUEST_TIMEOUT", "HEADERS_TOO_LARGE", "SERVER_BUSY", "HTTP_VERSION_NOT_SUPPORTED")

def cursor_pattern() -> str:
    """Exactly the cursors the API gives out: the id of a page's last row, 1 to 18 digits
    after "e:", base64url without padding (handlers.encode_cursor). Base64 turns 3 bytes into
    4 characters, and a digit's byte (0x30-0x39) into characters that depend on that digit
    alone, so a run of digits is a run of 3-digit blocks, each 4 characters from fixed sets."""
    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    digits = "0123456789"
    first2 = "|".join(sorted({b64(a + "00")[:2] for a in digits}))  # a block's 1st digit
    third = "".join(sorted({b64("0" + b + "0")[2] for b in digits}))  # its 2nd digit
    fourth = "".join(sorted({b64("00" + c)[3] for c in digits}))  # its 3rd digit
    one = "|".join(sorted({b64(a) for a in digits}))  # a last lone digit
    head = b64("e:0")[:3]  # "e:" and the first digit make the first block
    return (f"^{head}[{fourth}](?:(?:{first2})[{third}][{fourth}]){{0,5}}"
            f"(?:{one}|(?:{first2})[{third}])?$")


# ---- field types ------------------------------------------------------------------------------

# "Printable" is str.isprintable(), for the server (app/naming.py, the handlers) and for the
# document alike. The server's checks call it; the document's patterns are the exact set of
# code points it refuses (app/api/openapi.py: `printable_patterns`, built from it when the
# document is built). The patterns below, checked by msgspec as bodies and queries are
# decoded, are their cheap part: control characters and '/' for user ids, a non-space
# character for versions (a version of spaces alone names nothing).
USER_ID_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f/]{1,128}$"
USER_ID_RULE = "1 to 128 printable characters, no '/'; URL-encoded in paths"
UserId = Annotated[str, Meta(min_length=1, max_length=128, pattern=USER_ID_PATTERN,
                             description=USER_ID_RULE)]
VERSION_PATTERN = "[^ ]"  # searched: somewhere, a character other than a space
VERSION_RULE = "1 to 256 printable characters, not all spaces"
EngineVersion = Annotated[str, Meta(min_length=1, max_length=256, pattern=VERSION_PATTERN,
                                    description=VERSION_RULE)]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
Limit = Annotated[int, Meta(ge=1, le=1000, description="page size")]
Cursor = Annotated[str, Meta(min_length=1, max_length=64, pattern=cursor_pattern(),
                             description="opaque: the next_cursor of the previous page, as the "
                                         "API gave it out; not with follow=true")]
SNAPSHOT_ID_PATTERN = "^s-[0-9]{17}-[0-9a-f]{8}$"  # app.snapshots.service.ID_PATTERN
SnapshotId = Annotated[str, Meta(pattern=SNAPSHOT_ID_PATTERN,
                                 description="a snapshot's id, as the API gave it")]
# A page of snapshots ends at a snapshot: the next one starts after its id.
SnapshotCursor = Annotated[str, Meta(pattern=SNAPSHOT_ID_PATTERN,
                                     description="the next_cursor of the previous page, as given")]
EngineStatus = Literal["provisioning", "starting", "running", "stopping", "stopped",
                       "sleeping", "failed", "destroying"]
DenialReason = Literal["engine_not_found", "engine_sleeping", "engine_stopped",
                       "engine_unhealthy", "engine_starting"]


# ---- request bodies and queries ----------------------------------------------------------


class SnapshotRef(Struct, forbid_unknown_fields=True):
    user_id: UserId  # an engine of the same product
    snapshot_id: SnapshotId


class ProvisionBody(Struct, forbid_unknown_fields=True):
    user_id: UserId
    engine_version: EngineVersion | UnsetType = UNSET  # omitted: ORCH_ENGINE_IMAGE
    from_snapshot: SnapshotRef | UnsetType = UNSET  # the new brain: a copy of this snapshot's


class AdmitBody(Struct, forbid_unknown_fields=True):
    auto_provision: bool = False
    auto_wake: bool = False
    wait: bool = True  # false: never block on a boot; engine_starting instead


class UpgradeBody(Struct, forbid_unknown_fields=True):
    engine_version: EngineVersion


class RolloutBody(Struct, forbid_unknown_fields=True):
    to_version: EngineVersion
    from_version: EngineVersion | UnsetType = UNSET  # only the engines on this version
    batch_size: Annotated[int, Meta(ge=1, le=1000)] = 1
    max_failures: Annotated[int, Meta(ge=0, le=1_000_000)] = 0


class ListQuery(Struct, forbid_unknown_fields=True):
    status: EngineStatus | UnsetType = UNSET
    limit: Limit = 100
    cursor: Cursor | UnsetType = UNSET


class EventsQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: Cursor | UnsetType = UNSET
    follow: Annotated[bool, Meta(description="true: text/event-stream, the latest `limit` events "
                                             "then each new one; not with cursor")] = False


class RestoreBody(Struct, forbid_unknown_fields=True):
    snapshot_id: SnapshotId


class BrainQuery(Struct, forbid_unknown_fields=True):
    snapshot_id: SnapshotId | UnsetType = UNSET  # omitted: the newest


class SnapshotsQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: SnapshotCursor | UnsetType = UNSET


# ---- answers ------------------------------------------------------------------------------


class Engine(Struct):
    user_id: str
    status: EngineStatus
    url: str | None
    engine_version: str
    created_at: Timestamp
    updated_at: Timestamp
    last_admit_at: Timestamp | None
    restarts: Annotated[int, Meta(ge=0)]
    failure_reason: str | None


class Snapshot(Struct):
    id: str
    created_at: Timestamp
    size_bytes: Annotated[int, Meta(ge=0)]  # the brain's files, whole
    files: Annotated[int, Meta(ge=0)]
    engine_version: str  # the version that wrote the brain
    consistent: bool  # false: copied while the engine ran without a checkpoint (crash-consistent)


class SnapshotPage(Struct):
    snapshots: list[Snapshot]  # newest first
    next_cursor: str | None


class EngineWithKey(Engine):
    api_key: str  # shown this one time


class Provisioned(EngineWithKey):
    from_pool: bool = False  # taken from the product's warm pool, booted before it was asked for


class Destroyed(Struct):
    user_id: str
    destroyed: Literal[True]


class Admission(Struct, omit_defaults=True):
    """Admitted: every field but `reason`; denied: `admitted`, `reason` and `status` only."""

    admitted: bool
    status: EngineStatus | None
    user_id: str | UnsetType = UNSET
    url: str | UnsetType | None = UNSET
    api_key: str | UnsetType = UNSET
    engine_version: str | UnsetType = UNSET
    provisioned: bool | UnsetType = UNSET
    woken: bool | UnsetType = UNSET
    from_pool: bool | UnsetType = UNSET
    reason: DenialReason | UnsetType = UNSET


class RolloutFailure(Struct):
    user_id: str
    reason: str


RolloutStatus = Literal["running", "paused", "succeeded", "failed", "rolled_back", "aborted"]


class Rollout(Struct):
    id: int
    status: RolloutStatus
    to_version: str
    from_version: str | None
    batch_size: int
    max_failures: int
    total: int
    upgraded: int
    failed: int
    created_at: Timestamp
    updated_at: Timestamp
    failures: list[RolloutFailure]


class RolloutPage(Struct):
    rollouts: list[Rollout]  # newest first, at most 100


class EnginePage(Struct):
    engines: list[Engine]
    next_cursor: str | None


class Event(Struct, rename={"from_status": "from", "to_status": "to"}):
    id: int
    at: Timestamp
    engine: str  # the engine's name: the same for every engine the user has had
    # Which of them: ids are never reused, so a destroyed engine's events and its
    # successor's differ; null for events recorded before engine ids were kept.
    engine_id: int | None
    event: str
    from_status: str | None
    to_status: str | None
    reason: str | None
    request_id: str | None


class EventPage(Struct):
    events: list[Event]  # newest first
    next_cursor: str | None


class Health(Struct, omit_defaults=True):
    status: Literal["ok", "ready", "unavailable"]
    reason: str | UnsetType = UNSET


class ErrorDetail(Struct):
    code: str
    message: str
    request_id: str


class ErrorAnswer(Struct):
    error: ErrorDetail


class Text(Struct):
    """Marks a plain-text answer (the Prometheus exposition) in the table."""


class Archive(Struct):
    """Marks an answer (or, with `upload`, a request body) that is a tar archive."""


class Document(Struct):
    """Marks an answer that is a JSON document of its own (the OpenAPI document)."""


# ---- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str  # operationId, and the client's method name
    method: str
    path: str  # Starlette's syntax; {user_id} or {rollout_id} are the path parameters
    summary: str
    answer: type[Any]
    errors: tuple[str, ...] = ()  # besides COMMON_ERRORS (when auth)
    body: type[Struct] | None = None
    query: type[Struct] | None = None
    auth: bool = True  # X-Platform-Key
    also_ok: tuple[int, ...] = ()  # statuses answered with `answer`, not an error (readyz's 503)
    streams: bool = False  # may answer text/event-stream instead (events?follow=true)
    ok: int = 200  # the success status (202 for a rollout started)
    upload: bool = False  # the body is a tar archive (up to UPLOAD_MAX bytes), not JSON

    @property
    def codes(self) -> tuple[str, ...]:
        own = (*COMMON_ERRORS, *self.errors) if self.auth else self.errors
        return (*own, *EDGE_ERRORS)

    @property
    def body_required(self) -> bool:
        return self.body is not None and any(f.required for f in msgspec.structs.fields(self.body))


# Every call that moves an engine along the state table and drives it.
CHANGING = ("ILLEGAL_TRANSITION", "DRIVER_FAILED")
BOOTING = ("PORT_EXHAUSTION", "CAPACITY_EXHAUSTED", "BOOT_TIMEOUT", *CHANGING)

# Routes are tried in this order: admit, the hot path, first (Starlette matches route by
# route); where paths overlap, /engines/provision before /engines/{user_id}.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("admit", "POST", "/engines/{user_id}/admit",
             "Admit a user request: the engine's URL and key, or why not",
             Admission, ("RATE_LIMITED", "QUOTA_EXCEEDED", *BOOTING), body=AdmitBody),
    Endpoint("provision", "POST", "/engines/provision", "Create a user's engine and wait until it runs",
             Provisioned, ("ENGINE_ALREADY_EXISTS", "QUOTA_EXCEEDED", "ENGINE_NOT_FOUND",
                           "SNAPSHOT_NOT_FOUND", "SNAPSHOT_STORE_FAILED", *BOOTING),
             body=ProvisionBody),
    Endpoint("list", "GET", "/engines", "List the product's engines, a page at a time",
             EnginePage, query=ListQuery),
    Endpoint("get", "GET", "/engines/{user_id}", "Look up a user's engine", Engine,
             ("ENGINE_NOT_FOUND",)),
    Endpoint("destroy", "DELETE", "/engines/{user_id}",
             "Destroy a user's engine, its brain and its snapshots",
             Destroyed, ("ENGINE_NOT_FOUND", "SNAPSHOT_STORE_FAILED", *CHANGING)),
    Endpoint("start", "POST", "/engines/{user_id}/start", "Start a stopped, sleeping or failed engine",
             Engine, ("ENGINE_NOT_FOUND", "ENGINE_ALREADY_RUNNING", *BOOTING)),
    Endpoint("stop", "POST", "/engines/{user_id}/stop", "Stop an engine; its brain is kept",
             Engine, ("ENGINE_NOT_FOUND", "ENGINE_NOT_RUNNING", *CHANGING)),
    Endpoint("rotate_key", "POST", "/engines/{user_id}/rotate-key",
             "Give a running engine a new key; the old one is refused from then on",
             EngineWithKey, ("ENGINE_NOT_FOUND", "ENGINE_NOT_RUNNING", "KEY_NOT_CONFIRMED",
                             *CHANGING)),
    Endpoint("upgrade", "POST", "/engines/{user_id}/upgrade",
             "Move an engine to another engine_version, brain kept: a running one restarts on it "
             "(back on its old version and 502 UPGRADE_FAILED when not healthy in time), "
             "others take it at their next start",
             Engine, ("ENGINE_NOT_FOUND", "ENGINE_BUSY", "UPGRADE_FAILED", *CHANGING),
             body=UpgradeBody),
    Endpoint("events", "GET", "/engines/{user_id}/events",
             "The engine's audit events, newest first, a page at a time (kept after destroy); "
             "with follow=true a Server-Sent Events stream: the latest events, oldest first, "
             "then each new one, and a comment line every 15 s",
             EventPage, query=EventsQuery, streams=True),
    Endpoint("snapshot", "POST", "/engines/{user_id}/snapshots",
             "Copy the engine's brain into the snapshot store (a running engine is asked to "
             "checkpoint first); the oldest past ORCH_SNAPSHOT_KEEP are deleted",
             Snapshot, ("ENGINE_NOT_FOUND", "SNAPSHOT_STORE_FAILED", *CHANGING), ok=201),
    Endpoint("snapshots", "GET", "/engines/{user_id}/snapshots",
             "The engine's snapshots, newest first, a page at a time",
             SnapshotPage, ("ENGINE_NOT_FOUND", "SNAPSHOT_STORE_FAILED"), query=SnapshotsQuery),
    Endpoint("restore", "POST", "/engines/{user_id}/restore",
             "Stop the engine, replace its brain with the snapshot's and start it again; a "
             "missing or damaged snapshot changes nothing",
             Engine, ("ENGINE_NOT_FOUND", "SNAPSHOT_NOT_FOUND", "SNAPSHOT_STORE_FAILED", *BOOTING),
             body=RestoreBody),
    Endpoint("export_brain", "GET", "/engines/{user_id}/brain",
             "A snapshot (the newest unless snapshot_id is given) as a tar archive",
             Archive, ("ENGINE_NOT_FOUND", "SNAPSHOT_NOT_FOUND", "SNAPSHOT_STORE_FAILED"),
             query=BrainQuery),
    Endpoint("import_brain", "POST", "/engines/{user_id}/brain",
             "Store a tar archive of files (application/x-tar, optionally gzipped) as the "
             "engine's newest snapshot; restore applies it",
             Snapshot, ("ENGINE_NOT_FOUND", "SNAPSHOT_STORE_FAILED", *CHANGING), upload=True, ok=201),
    Endpoint("start_rollout", "POST", "/rollouts",
             "Start moving the product's engines (those on from_version, when given) to "
             "to_version, batch_size at a time; more than max_failures failures roll it back",
             Rollout, body=RolloutBody, ok=202),
    Endpoint("rollouts", "GET", "/rollouts", "The product's rollouts, newest first", RolloutPage),
    Endpoint("rollout", "GET", "/rollouts/{rollout_id}", "One rollout and its progress", Rollout,
             ("NOT_FOUND",)),
    Endpoint("rollout_events", "GET", "/rollouts/{rollout_id}/events",
             "The audit events of the rollout's engines since it started, newest first, a page "
             "at a time; with follow=true a Server-Sent Events stream, as for an engine",
             EventPage, ("NOT_FOUND",), query=EventsQuery, streams=True),
    Endpoint("pause_rollout", "POST", "/rollouts/{rollout_id}/pause",
             "Pause a rollout after its current batch", Rollout, ("NOT_FOUND", "ROLLOUT_FINISHED")),
    Endpoint("resume_rollout", "POST", "/rollouts/{rollout_id}/resume", "Resume a paused rollout",
             Rollout, ("NOT_FOUND", "ROLLOUT_FINISHED")),
    Endpoint("abort_rollout", "POST", "/rollouts/{rollout_id}/abort",
             "Stop a rollout after its current batch; upgraded engines stay as they are",
             Rollout, ("NOT_FOUND", "ROLLOUT_FINISHED")),
    Endpoint("healthz", "GET", "/healthz", "The process is up", Health, auth=False),
    Endpoint("readyz", "GET", "/readyz", "The database and the scheduler answer (503 when not)",
             Health, auth=False, also_ok=(503,)),
    Endpoint("metrics", "GET", "/metrics",
             "Prometheus metrics (Authorization: Bearer ORCH_METRICS_TOKEN when that is set)",
             Text, ("UNAUTHORIZED",), auth=False),
    Endpoint("openapi", "GET", "/openapi.json", "This document", Document, auth=False),
)

BY_NAME: dict[str, Endpoint] = {e.name: e for e in ENDPOINTS}
