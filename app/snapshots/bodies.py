"""What the snapshot operations do (Bodies.snapshot and Bodies.restore, rows of
app.operations' TABLE), run like every other
operation under the engine's flight and lease: a snapshot never runs beside a stop, a restore
or a destroy of the same engine, nor beside another snapshot.

Where the driver has no brain directory here (Nomad), the driver copies the brain where it lives
(`Driver.copy_brain`: the engine's sidecar) and a restore gives the engine a new brain filled
before it starts (`Driver.restore_brain`); the manifest is built and listed here either way.

A running engine is asked to checkpoint first (`POST /v1/checkpoint`, app/CONTRACT.md): it
flushes and holds its writes until the copy is done (`DELETE /v1/checkpoint`), and the snapshot
is `consistent`. An engine without the call is copied as it runs: crash-consistent, and said so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import httpx

from app import errors, registry, states
from app.config import Settings
from app.drivers.base import Driver, EngineSpec, State
from app.registry import EngineRow
from app.snapshots import tree
from app.snapshots.service import Manifest, Snapshots, build_manifest

log = logging.getLogger("orch.snapshots")

class Bodies(Protocol):
    """What these bodies use of app.bodies.Bodies (which calls them)."""

    settings: Settings
    driver: Driver
    http: httpx.AsyncClient
    snapshots: Snapshots

    def spec(self, row: EngineRow) -> EngineSpec: ...

    def api_key(self, row: EngineRow) -> str: ...

    async def bring_up(self, row: EngineRow, how: Literal["start"]) -> EngineRow: ...


HOLD_S = 60.0  # the longest an engine holds its writes for us, should we never come back
CHECKPOINT_TIMEOUT_S = 10.0


async def snapshot(bodies: Bodies, row: EngineRow, scheduled: bool = False) -> Manifest | None:
    """Copy the engine's brain into the store. Scheduled: only when it changed since the
    latest snapshot (None when it did not)."""
    return (await _snapshot(bodies, row, scheduled))[0]


async def before_stop(bodies: Bodies, row: EngineRow) -> EngineRow:
    """Where a stopped engine's brain cannot be copied (Nomad: the sidecar stops with the
    engine), a running engine's brain that changed since its latest snapshot is copied before
    it stops, while it can still checkpoint: a stopped engine's newest snapshot is then its
    brain, and losing its node while it is stopped loses nothing. Not with the schedule off;
    a copy that fails or outlasts ORCH_STOP_GRACE_S is logged and the stop goes on."""
    driver = bodies.driver
    if bodies.settings.snapshot_interval_s <= 0 or row.in_pool or row.status != states.RUNNING \
            or not driver.remote_snapshots() or driver.brain_dir(bodies.spec(row)) is not None:
        return row
    # A store that hangs must not hold a stop for the copy's own 15 minutes: the copy gets
    # the time the engine gets to exit. One cut off leaves blobs that pruning collects.
    grace = bodies.settings.stop_grace_s
    try:
        return (await asyncio.wait_for(_snapshot(bodies, row, scheduled=True), grace))[1]
    except (errors.DomainError, TimeoutError) as exc:
        log.warning("engine %s stops without a last snapshot: %s", row.name,
                    exc if str(exc) else f"the copy took longer than {grace:g} s")
        return registry.reload(row) or row


async def _snapshot(bodies: Bodies, row: EngineRow,
                    scheduled: bool) -> tuple[Manifest | None, EngineRow]:
    brain = _brain(bodies, row)
    snaps = bodies.snapshots
    if scheduled and not await snaps.changed(row.name, await _fingerprint(bodies, row, brain)):
        return None, row
    held = await _checkpoint(bodies, row)
    try:
        manifest = await _copy(bodies, row, brain, consistent=held or _quiet(bodies, row))
    finally:
        kept = held and await _resume(bodies, row)
    if held and not kept:
        log.warning("engine %s let its checkpoint go before the copy ended", row.name)
        manifest["consistent"] = False
    await snaps.commit(row.name, manifest)
    row = registry.update(row, audit_event="snapshot", reason=manifest["id"])
    await snaps.prune(row.name)
    return manifest, row


async def import_brain(bodies: Bodies, row: EngineRow, archive: IO[bytes]) -> Manifest:
    """An uploaded tar archive becomes the engine's newest snapshot (restore applies it)."""
    snaps = bodies.snapshots
    manifest = await snaps.import_archive(row.name, archive, engine_version=row.engine_version)
    await snaps.commit(row.name, manifest)
    snaps.forget(row.name)  # not a copy of the brain as it is: the schedule must not skip
    registry.update(row, audit_event="snapshot_imported", reason=manifest["id"])
    await snaps.prune(row.name)
    return manifest


async def _fingerprint(bodies: Bodies, row: EngineRow, brain: Path | None) -> str:
    if brain is None:
        return await bodies.driver.brain_fingerprint(bodies.spec(row), row.driver_state)
    return await asyncio.to_thread(tree.fingerprint, brain)


async def _copy(bodies: Bodies, row: EngineRow, brain: Path | None, consistent: bool) -> Manifest:
    if brain is not None:
        return await bodies.snapshots.take(row.name, brain, engine_version=row.engine_version,
                                           consistent=consistent)
    copied = await bodies.driver.copy_brain(bodies.spec(row), row.driver_state)
    return build_manifest(row.name, copied, fingerprint=copied["fingerprint"],
                          engine_version=row.engine_version, consistent=consistent,
                          now=time.time())


async def create(bodies: Bodies, row: EngineRow, api_key: str,
                 seed: tuple[str, Manifest] | None) -> State:
    """The driver's create of a new engine; with `seed` (`provision` from_snapshot: another
    engine's name and snapshot), its brain a copy of that snapshot before it first runs. Where
    the brain lives elsewhere, that is a restore into the engine's first volume."""
    driver, spec = bodies.driver, bodies.spec(row)
    if seed is None:
        return await driver.create(spec, api_key)
    if driver.brain_dir(spec) is not None or not driver.remote_snapshots():
        await _seed(bodies, row, *seed)
        return await driver.create(spec, api_key)
    source, manifest = seed
    state = await driver.restore_brain(spec, {}, source, manifest["id"])
    return await driver.launch(spec, state, api_key)


async def _seed(bodies: Bodies, row: EngineRow, source: str, manifest: Manifest) -> None:
    """A new engine's brain directory: a copy of another engine's snapshot."""
    brain = _brain(bodies, row)
    assert brain is not None
    staging = await bodies.snapshots.stage(source, manifest, brain)
    try:
        tree.replace(staging, brain)
    finally:
        tree.discard(staging)


async def restore(bodies: Bodies, row: EngineRow, snapshot_id: str, *, elsewhere: bool = False,
                  reason: str = "restore") -> EngineRow:
    """Stop the engine, make its brain the snapshot's, start it again. The snapshot is read
    (and, here, checked) before the engine is touched, so a missing or damaged one changes
    nothing. Where the brain lives elsewhere, the driver gives the engine a new brain that its
    start fills (on another node when `elsewhere`); a fill that fails leaves the engine failed
    and its old brain kept, and the next start fills it again. `reason` ends the `restored`
    audit event, after the snapshot id and the data's age."""
    brain = _brain(bodies, row)
    snaps = bodies.snapshots
    manifest = await snaps.get(row.name, snapshot_id)
    if manifest is None:
        raise errors.snapshot_not_found(row.user_id, snapshot_id)
    if brain is None:
        await bodies.driver.ping()
        row = await _stop(bodies, row, reason)
        saved = [row]

        def save(planned: State) -> None:
            saved[0] = registry.update(saved[0], driver_state=planned)

        state = await bodies.driver.restore_brain(bodies.spec(row), row.driver_state, row.name,
                                                  snapshot_id, elsewhere=elsewhere, save=save)
        row = registry.update(saved[0], driver_state=state)
    else:
        staging = await snaps.stage(row.name, manifest, brain)
        try:
            await bodies.driver.ping()
            row = await _stop(bodies, row, reason)
            tree.replace(staging, brain)
        finally:
            tree.discard(staging)
    snaps.forget(row.name)
    age = max(0, int(time.time() - manifest["created_at"]))
    row = registry.update(row, audit_event="restored",
                          reason=f"{snapshot_id} data_age_s={age} {reason}")
    return await bodies.bring_up(row, "start")


async def _stop(bodies: Bodies, row: EngineRow, reason: str) -> EngineRow:
    if row.status == states.STOPPED:
        return row
    row = registry.transition(row, "stop", reason)
    state = await bodies.driver.stop(bodies.spec(row), row.driver_state, bodies.settings.stop_grace_s)
    return registry.transition(row, "stopped", reason, driver_state=state, url=None)


def _brain(bodies: Bodies, row: EngineRow) -> Path | None:
    """The brain's directory here; None where the driver copies it where it lives."""
    brain = bodies.driver.brain_dir(bodies.spec(row))
    if brain is None and not bodies.driver.remote_snapshots():
        raise errors.invalid(f"the {bodies.driver.name} driver does not take snapshots "
                             f"(its job template has no `snapshot` task)")
    return brain


def _quiet(bodies: Bodies, row: EngineRow) -> bool:
    """No process can be writing: the copy is consistent without a checkpoint."""
    return row.status in (states.STOPPED, states.FAILED) or \
        (row.status == states.SLEEPING and bodies.settings.sleep_mode == "stop")


async def _checkpoint(bodies: Bodies, row: EngineRow) -> bool:
    if row.status != states.RUNNING or not row.url:
        return False
    try:
        answer = await bodies.http.post(f"{row.url}/v1/checkpoint", json={"hold_s": HOLD_S},
                                        headers=_auth(bodies, row), timeout=CHECKPOINT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        log.info("engine %s did not checkpoint (%s): a crash-consistent copy", row.name, exc)
        return False
    return answer.status_code == 200


async def _resume(bodies: Bodies, row: EngineRow) -> bool:
    """Let the engine write again; False when it had already let go (its hold ran out)."""
    assert row.url
    try:
        answer = await bodies.http.delete(f"{row.url}/v1/checkpoint", headers=_auth(bodies, row),
                                          timeout=CHECKPOINT_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def _auth(bodies: Bodies, row: EngineRow) -> dict[str, Any]:
    return {"Authorization": f"Bearer {bodies.api_key(row)}"}
