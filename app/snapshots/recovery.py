"""Brains that outlive their node (Bodies.restore_elsewhere and Bodies.tidy, rows of
app.operations' TABLE, which the reconciler runs).

An engine whose node is lost is failed `node_lost`. While the node is down, a restart would
only fail again, so none is spent (Bodies.restart waits for the brain to be reachable): the
engine comes back with its node if the node returns. Once it has been failed `node_lost` for
ORCH_NODE_LOST_RESTORE_S, it is created again on a healthy node from its latest snapshot: a new
brain, the same user, the same key; the audit event `restored` says `node_lost` and how old the
data is (`data_age_s`). What the old node held is the driver's to remove once the node is back
(its `tidy`), so the stale brain is never mounted again.
"""

from __future__ import annotations

import logging
import time

from app import registry, states
from app.drivers.base import LEFTOVERS
from app.errors import NodeLost
from app.registry import EngineRow
from app.snapshots import bodies as snapshot_bodies
from app.snapshots.bodies import Bodies

log = logging.getLogger("orch.snapshots")

NODE_LOST = NodeLost.reason
# How often a failed engine whose node is down looks again for its node.
NODE_RECHECK_S = 10.0


async def unreachable(bodies: Bodies, row: EngineRow) -> bool:
    """A failed engine's brain is on a node that is down: a restart cannot bring it back."""
    return row.failure_reason == NODE_LOST and \
        not await bodies.driver.brain_available(bodies.spec(row), row.driver_state)


def wait_for_node(row: EngineRow) -> EngineRow:
    """Look again later, without spending a restart or leaving `failed` (whose start time is
    how long the node has been lost)."""
    return registry.update(row, next_restart_at=time.time() + NODE_RECHECK_S)


async def restore_elsewhere(bodies: Bodies, row: EngineRow) -> EngineRow:
    """The engine again, on another node, from its latest snapshot; a no-op unless it is
    still failed `node_lost`, for long enough, with its node still down."""
    wait = bodies.settings.node_lost_restore_s
    if wait <= 0 or row.status != states.FAILED or row.failure_reason != NODE_LOST:
        return row
    if time.time() - row.status_since < wait or not await unreachable(bodies, row):
        return row
    latest = await bodies.snapshots.list(row.name, limit=1)
    if not latest:
        log.warning("engine %s: its node is lost and it has no snapshot to be restored from; "
                    "it waits for its node", row.name)
        return row
    log.warning("engine %s: node lost for %.0fs, restoring snapshot %s on another node",
                row.name, time.time() - row.status_since, latest[0]["id"])
    return await snapshot_bodies.restore(bodies, row, latest[0]["id"], elsewhere=True,
                                         reason=NODE_LOST)


async def tidy(bodies: Bodies, row: EngineRow) -> EngineRow:
    """Remove what the driver left to remove later (a brain on a node that was down)."""
    if LEFTOVERS not in row.driver_state:
        return row
    state = await bodies.driver.tidy(bodies.spec(row), row.driver_state)
    if state == row.driver_state:
        return row
    return registry.update(row, driver_state=state)
