"""The handlers behind the endpoint table: each takes the checked request and runs its
operation (app.operations) or reads the registry. Shapes of the answers are the table's
Structs (app/api/spec.py)."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import UNSET
from starlette.responses import StreamingResponse

from app import errors, naming, registry
from app.admit import Admitter
from app.api import follow, spec
from app.operations import Engines, Op, ProductRef

CURSOR_MAX = 2**62  # below SQLite's and PostgreSQL's largest integer


@dataclass
class Services:
    engines: Engines
    admitter: Admitter


@dataclass
class Call:
    """A request that passed the table's checks."""

    product: ProductRef
    user_id: str  # "" for the routes without one
    body: Any  # the endpoint's body Struct, or None
    query: Any  # the endpoint's query Struct, or None
    rollout_id: int = 0  # the routes with {rollout_id}

    @property
    def key(self) -> tuple[int, str]:
        return self.product.id, self.user_id


Handler = Callable[[Services, Call], Awaitable[Any]]


async def provision(svc: Services, call: Call) -> Any:
    body: spec.ProvisionBody = call.body
    check_user_id(body.user_id)
    version = None if body.engine_version is UNSET else body.engine_version
    if version is not None and not version.isprintable():
        raise errors.invalid("engine_version must be 1 to 256 printable characters")
    seed = None if body.from_snapshot is UNSET else await _seed(svc, call, body.from_snapshot)
    engine, api_key = await svc.engines.run(Op.PROVISION, (call.product.id, body.user_id),
                                            product_name=call.product.name, engine_version=version,
                                            seed=seed)
    return spec.Provisioned(**_engine_fields(engine), api_key=api_key,
                            from_pool=engine.claimed_at is not None)


async def get(svc: Services, call: Call) -> Any:
    return engine_struct(_engine(call))


async def destroy(svc: Services, call: Call) -> Any:
    await svc.engines.run(Op.DESTROY, call.key)
    return spec.Destroyed(call.user_id, True)


async def start(svc: Services, call: Call) -> Any:
    return engine_struct(await svc.engines.run(Op.START, call.key))


async def stop(svc: Services, call: Call) -> Any:
    return engine_struct(await svc.engines.run(Op.STOP, call.key))


async def rotate_key(svc: Services, call: Call) -> Any:
    engine, api_key = await svc.engines.run(Op.ROTATE, call.key)
    return with_key(engine, api_key)


async def upgrade(svc: Services, call: Call) -> Any:
    body: spec.UpgradeBody = call.body
    if not body.engine_version.isprintable():
        raise errors.invalid("engine_version must be 1 to 256 printable characters")
    return engine_struct(await svc.engines.run(Op.UPGRADE, call.key, version=body.engine_version))


async def admit(svc: Services, call: Call) -> Any:
    body: spec.AdmitBody = call.body
    return await svc.admitter.admit(call.product, call.user_id, body.auto_provision, body.auto_wake,
                                    body.wait)


async def list_engines(svc: Services, call: Call) -> Any:
    query: spec.ListQuery = call.query
    status = None if query.status is UNSET else query.status
    after = 0 if query.cursor is UNSET else decode_cursor(query.cursor)
    rows = registry.list_engines(call.product.id, status, after, query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return spec.EnginePage([engine_struct(e) for e in rows], _next_cursor(rows, more))


async def events(svc: Services, call: Call) -> Any:
    query: spec.EventsQuery = call.query
    if query.follow:  # a stream, not a page: the cursor does not apply
        if query.cursor is not UNSET:
            raise errors.invalid("cursor does not go with follow=true")
        recent, newer = follow.engine_events(call.product.id, call.user_id)
        return follow.follow(recent, newer, query.limit, event_struct)
    before = None if query.cursor is UNSET else decode_cursor(query.cursor)
    rows = registry.events_page(call.product.id, call.user_id, before, query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return spec.EventPage([event_struct(e) for e in rows], _next_cursor(rows, more))


async def snapshot(svc: Services, call: Call) -> Any:
    _engine(call)
    manifest = await svc.engines.run(Op.SNAPSHOT, call.key, scheduled=False)
    return snapshot_struct(manifest)


async def snapshots(svc: Services, call: Call) -> Any:
    query: spec.SnapshotsQuery = call.query
    after = None if query.cursor is UNSET else query.cursor
    found = await svc.engines.bodies.snapshots.list(_engine(call).name, after, query.limit + 1)
    more = len(found) > query.limit
    found = found[:query.limit]
    cursor = found[-1]["id"] if more else None
    return spec.SnapshotPage([snapshot_struct(m) for m in found], cursor)


async def restore(svc: Services, call: Call) -> Any:
    body: spec.RestoreBody = call.body
    _engine(call)
    return engine_struct(await svc.engines.run(Op.RESTORE, call.key, snapshot_id=body.snapshot_id))


async def export_brain(svc: Services, call: Call) -> Any:
    query: spec.BrainQuery = call.query
    row = _engine(call)
    snaps = svc.engines.bodies.snapshots
    if query.snapshot_id is UNSET:
        newest = await snaps.list(row.name, limit=1)
        manifest = newest[0] if newest else None
    else:
        manifest = await snaps.get(row.name, query.snapshot_id)
    if manifest is None:
        wanted = "(the newest)" if query.snapshot_id is UNSET else query.snapshot_id
        raise errors.snapshot_not_found(call.user_id, wanted)
    filename = f"{row.name}-{manifest['id']}.tar"
    return StreamingResponse(snaps.export(row.name, manifest), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def import_brain(svc: Services, call: Call) -> Any:
    _engine(call)
    try:
        manifest = await svc.engines.run(Op.IMPORT_BRAIN, call.key, archive=call.body,
                                         upload=uuid.uuid4().hex)
    finally:
        call.body.close()
    return snapshot_struct(manifest)


async def _seed(svc: Services, call: Call, ref: spec.SnapshotRef) -> tuple[str, Any]:
    """The snapshot a new engine starts from, found before anything is created."""
    check_user_id(ref.user_id)
    source = registry.find_engine(call.product.id, ref.user_id)
    if source is None:
        raise errors.engine_not_found(ref.user_id)
    manifest = await svc.engines.bodies.snapshots.get(source.name, ref.snapshot_id)
    if manifest is None:
        raise errors.snapshot_not_found(ref.user_id, ref.snapshot_id)
    return source.name, manifest


def _engine(call: Call) -> Any:
    row = registry.find_engine(*call.key)
    if row is None:
        raise errors.engine_not_found(call.user_id)
    return row


HANDLERS: dict[str, Handler] = {
    "provision": provision, "list": list_engines, "get": get, "destroy": destroy,
    "start": start, "stop": stop, "rotate_key": rotate_key, "admit": admit, "events": events,
    "upgrade": upgrade, "snapshot": snapshot, "snapshots": snapshots, "restore": restore,
    "export_brain": export_brain, "import_brain": import_brain,
}


# ---- shapes -----------------------------------------------------------------------------


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def _engine_fields(engine: Any) -> dict[str, Any]:
    # Only these attributes of an engine row are ever shown (never its key or driver state).
    return {"user_id": engine.user_id, "status": engine.status, "url": engine.url,
            "engine_version": engine.engine_version, "created_at": iso(engine.created_at),
            "updated_at": iso(engine.updated_at), "last_admit_at": iso_or_none(engine.last_admit_at),
            "restarts": engine.restarts, "failure_reason": engine.failure_reason}


def engine_struct(engine: Any) -> spec.Engine:
    return spec.Engine(**_engine_fields(engine))


def with_key(engine: Any, api_key: str) -> spec.EngineWithKey:
    return spec.EngineWithKey(**_engine_fields(engine), api_key=api_key)


def event_struct(event: Any) -> spec.Event:
    return spec.Event(event.id, iso(event.at), event.engine_name, event.engine_id, event.event,
                      event.from_status, event.to_status, event.reason, event.request_id)


def snapshot_struct(manifest: dict[str, Any]) -> spec.Snapshot:
    return spec.Snapshot(manifest["id"], iso(manifest["created_at"]), manifest["size_bytes"],
                         len(manifest["files"]), manifest["engine_version"], manifest["consistent"])


def snapshot_json(manifest: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as the API shows it, as a dict (for the CLI's JSON output)."""
    shown: dict[str, Any] = msgspec.to_builtins(snapshot_struct(manifest))
    return shown


def check_user_id(user_id: str) -> str:
    problem = naming.user_id_problem(user_id)
    if problem:
        raise errors.invalid(problem)
    return user_id


def _next_cursor(rows: list[Any], more: bool) -> str | None:
    return encode_cursor(rows[-1].id) if more else None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"e:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.invalid("cursor is not one this API gave out") from None
    prefix, _, value = text.partition(":")
    if prefix != "e" or not (value.isascii() and value.isdigit()) or int(value) >= CURSOR_MAX:
        raise errors.invalid("cursor is not one this API gave out")
    return int(value)


def engine_json(engine: Any) -> dict[str, Any]:
    """An engine as the API shows it, as a dict (for the CLI's JSON output)."""
    shown: dict[str, Any] = msgspec.to_builtins(engine_struct(engine))
    return shown


def event_json(event: Any) -> dict[str, Any]:
    """An event as the API shows it, as a dict (for the CLI's JSON output)."""
    shown: dict[str, Any] = msgspec.to_builtins(event_struct(event))
    return shown
