"""The engine state machine: one table, nothing else.

Every change of an engine's state goes through `next_state`, and is written as one
compare-and-set on the engine's row plus one audit event (see registry.transition).
"""

from __future__ import annotations

import itertools

from app.errors import IllegalTransition

__all__ = ["STATES", "TABLE", "TRANSIENT", "IllegalTransition", "allowed", "is_valid_path", "next_state"]

PROVISIONING = "provisioning"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
SLEEPING = "sleeping"
FAILED = "failed"
DESTROYING = "destroying"

STATES = (PROVISIONING, STARTING, RUNNING, STOPPING, STOPPED, SLEEPING, FAILED, DESTROYING)

# event -> (states it may leave from, state it leads to). `None` as a source is "no row yet".
TABLE: dict[str, tuple[frozenset[str | None], str]] = {
    "provision": (frozenset({None}), PROVISIONING),
    "ready": (frozenset({PROVISIONING, STARTING}), RUNNING),
    "boot_failed": (frozenset({PROVISIONING, STARTING}), FAILED),
    "sleep": (frozenset({RUNNING}), SLEEPING),
    "start": (frozenset({SLEEPING, STOPPED, FAILED}), STARTING),
    "stop": (frozenset({RUNNING, SLEEPING, STARTING, PROVISIONING, FAILED}), STOPPING),
    "stopped": (frozenset({STOPPING}), STOPPED),
    # A sleeping engine fails only with its node (node_lost): its brain must move.
    "fail": (frozenset({RUNNING, SLEEPING}), FAILED),
    "destroy": (frozenset(STATES), DESTROYING),
    # A running engine is restarted on a new version; it comes back on the new
    # one (upgraded) or, not healthy in time, on its previous one (upgrade_rolled_back).
    "upgrade": (frozenset({RUNNING}), STARTING),
    "upgraded": (frozenset({STARTING}), RUNNING),
    "upgrade_rolled_back": (frozenset({STARTING}), RUNNING),
    # A warm pool's engine taken by a user: starting until it knows its user (and is resumed,
    # if it waited paused), so a claimer that dies half-way leaves a row recovery settles.
    "claimed": (frozenset({RUNNING, SLEEPING}), STARTING),
}

# States in which an operation is under way; one that sits here longer than the boot timeout
# (plus the stop grace) was left behind by a dead orchestrator.
TRANSIENT = frozenset({PROVISIONING, STARTING, STOPPING, DESTROYING})


def next_state(state: str | None, event: str) -> str:
    sources, target = TABLE[event]
    if state not in sources:
        raise IllegalTransition(event, state)
    return target


def allowed(state: str | None, event: str) -> bool:
    return state in TABLE[event][0]


def is_valid_path(states: list[str | None]) -> bool:
    """Whether a sequence of states (oldest first) only ever moves along the table."""
    targets = {(src, dst) for sources, dst in TABLE.values() for src in sources}
    return all((a, b) in targets for a, b in itertools.pairwise(states))
