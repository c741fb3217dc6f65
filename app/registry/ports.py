"""The local driver's port pool: a port is an engine's while its `port_lease` row exists (a
primary key, so two replicas on one host never hand out the same one). This module is the
`PortPool` (app.drivers.local) the service gives the driver; the driver never imports it."""

from __future__ import annotations

from collections.abc import Callable

import peewee as pw

from app.registry.db import tuples
from app.registry.models import PortLease, db


def reserve(name: str, low: int, high: int, usable: Callable[[int], bool]) -> int | None:
    """The first port in [low, high] nobody leased and `usable` accepts, now `name`'s."""
    taken = {port for (port,) in tuples(PortLease.select(PortLease.port))}
    for port in range(low, high + 1):
        if port in taken or not usable(port):
            continue
        try:
            with db.atomic():
                PortLease.create(port=port, engine_name=name)
            return port
        except pw.IntegrityError:
            continue  # another replica took it between our read and our insert
    return None


def give_back(port: int) -> None:
    PortLease.delete().where(PortLease.port == port).execute()


def release_all(name: str) -> None:
    PortLease.delete().where(PortLease.engine_name == name).execute()


def holders() -> set[str]:
    return {str(name) for (name,) in tuples(PortLease.select(PortLease.engine_name))}
