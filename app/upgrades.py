"""Upgrades: move an engine to another engine_version, keeping its brain.

A running engine goes `upgrade` (running -> starting, the row already on the new version and
remembering the old one in `previous_version`), is stopped gracefully and launched on the new
version with the same brain, port or volume and key. Healthy within the boot timeout:
`upgraded`. Not: it is stopped and launched again on the old version, `upgrade_rolled_back`,
and the caller gets UpgradeFailed (502). Both the answer and the audit reason name the cause:
the new version crashed (`crashed`), was not healthy in time (`boot_timeout`), or could not be
placed (the placement reason: `port_exhausted`, `node_lost`, `placement_failed`, ...). An
engine that is not running only records the new version; its next start or wake cold-starts
on it. Every step's audit reason names both versions ("old -> new").

The row names what is (being) launched at every moment, and `previous_version` marks an
upgrade in flight, so an owner that dies mid-upgrade leaves enough for `settle` to put the
engine back on its previous version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from app import registry, states
from app.config import Settings
from app.drivers.base import Driver, EngineSpec, State
from app.errors import BootTimeout, DriverError, EngineCrashed, UpgradeFailed
from app.registry import EngineRow

log = logging.getLogger("orch.lifecycle")

QUICK_STOP_S = 5.0  # stopping a version that failed to boot: no need for the whole grace


class Upgrader:
    def __init__(self, settings: Settings, driver: Driver, spec: Callable[[EngineRow], EngineSpec],
                 api_key: Callable[[EngineRow], str]):
        self.settings = settings
        self.driver = driver
        self.spec = spec
        self.api_key = api_key

    async def upgrade(self, row: EngineRow, version: str) -> EngineRow:
        """Called with the row leased and settled (not transient)."""
        if version == row.engine_version:
            return row  # already there: nothing to restart, nothing to record
        await self.driver.ping()
        old = row.engine_version
        if row.status != states.RUNNING:
            return await self._record(row, old, version)
        row = registry.transition(row, "upgrade", _versions(old, version),
                                  engine_version=version, previous_version=old)
        state = await self.driver.stop(self.spec(replace(row, engine_version=old)),
                                       row.driver_state, self.settings.stop_grace_s)
        row = registry.update(row, driver_state=state, url=None)
        try:
            row, state, url = await self._bring_up(row)
        except _NotUp as failed:
            cause = failed.cause
            log.info("engine %s not healthy on %s (%s); back to %s", row.name, version, cause, old)
            await self.roll_back(failed.row, cause.state or failed.row.driver_state, cause.reason)
            raise UpgradeFailed(f"engine version {version!r} {self._what_happened(cause)} "
                                f"({cause.message}); the engine is back on {old!r}") from None
        return registry.transition(row, "upgraded", _versions(old, version), driver_state=state,
                                   url=url, previous_version=None, failure_reason=None)

    async def roll_back(self, row: EngineRow, state: State, why: str) -> EngineRow:
        """Stop what runs of the new version, relaunch the previous one: upgrade_rolled_back,
        or (the old version does not come up either) boot_failed, for the reconciler."""
        assert row.previous_version is not None
        new, old = row.engine_version, row.previous_version
        state = await self.driver.stop(self.spec(row), state, self._quick_stop())
        # Written before the relaunch: the row names what runs, should this owner die now.
        row = registry.update(row, engine_version=old, driver_state=state, url=None)
        try:
            row, state, url = await self._bring_up(row)
        except _NotUp as failed:
            stopped = await self.driver.stop(self.spec(failed.row),
                                             failed.cause.state or failed.row.driver_state,
                                             self._quick_stop())
            reason = failed.cause.reason
            registry.transition(failed.row, "boot_failed", f"{reason}; {_versions(new, old)}",
                                driver_state=stopped, url=None, previous_version=None,
                                failure_reason=reason)
            raise UpgradeFailed(f"neither {new!r} nor the previous {old!r} became healthy; the "
                                f"engine is failed (brain kept)") from None
        return registry.transition(row, "upgrade_rolled_back", f"{why}; {_versions(new, old)}",
                                   driver_state=state, url=url, previous_version=None,
                                   failure_reason=None)

    async def settle(self, row: EngineRow) -> EngineRow:
        """An owner died mid-upgrade (starting, previous_version set): back to the old version."""
        try:
            return await self.roll_back(row, row.driver_state, "interrupted")
        except UpgradeFailed:
            fresh = registry.reload(row)
            assert fresh is not None
            return fresh

    async def _bring_up(self, row: EngineRow) -> tuple[EngineRow, State, str]:
        """Launch the row's version on the same brain and wait for health. On a failure,
        _NotUp carries the row as written and the driver's error (what was left running)."""
        spec = self.spec(row)
        try:
            state = await self.driver.launch(spec, row.driver_state, self.api_key(row))
        except DriverError as exc:
            raise _NotUp(row, exc) from None
        row = registry.update(row, driver_state=state)  # a settle after a crash can stop it
        try:
            state, url = await self.driver.wait_ready(spec, state, self.settings.boot_timeout_s)
        except DriverError as exc:
            raise _NotUp(row, exc) from None
        return row, state, url

    def _what_happened(self, cause: DriverError) -> str:
        if isinstance(cause, EngineCrashed):
            return "crashed while booting"
        if isinstance(cause, BootTimeout):
            return f"did not become healthy within {self.settings.boot_timeout_s:g}s"
        return f"could not be placed: {cause.reason}"

    def _quick_stop(self) -> float:
        return min(self.settings.stop_grace_s, QUICK_STOP_S)

    async def _record(self, row: EngineRow, old: str, version: str) -> EngineRow:
        """Not running: the new version applies at the next start or wake. A paused sleeper's
        process is stopped so that its wake is a cold start on the new version."""
        fields: dict[str, object] = {"engine_version": version}
        if row.status == states.SLEEPING and row.driver_state:
            fields["driver_state"] = await self.driver.stop(
                self.spec(row), row.driver_state, self.settings.stop_grace_s)
            fields["url"] = None
        return registry.update(row, audit_event="upgraded",
                               reason=f"{_versions(old, version)}; applies at next start", **fields)


class _NotUp(Exception):
    def __init__(self, row: EngineRow, cause: DriverError):
        super().__init__(cause.message)
        self.row, self.cause = row, cause


def _versions(old: str, new: str) -> str:
    return f"{old} -> {new}"
