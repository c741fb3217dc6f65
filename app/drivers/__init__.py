"""Drivers run engines: `local` (child processes) and `nomad` (one Nomad job per engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.config import Settings
from app.drivers.base import Driver

if TYPE_CHECKING:
    from app.drivers.local import PortPool


def make_driver(settings: Settings, ports: PortPool) -> Driver:
    """`ports`: the local driver's port pool (app.registry.ports); a driver never reaches
    the registry itself."""
    from app.drivers.instrumented import Instrumented

    if settings.driver == "nomad":
        from app.drivers.nomad import NomadDriver

        return Instrumented(NomadDriver(settings))
    from app.drivers.local import LocalDriver

    return Instrumented(LocalDriver(settings, ports))
