"""Drivers run engines: `local` (child processes) and `nomad` (one Nomad job per engine)."""

from __future__ import annotations

from app.config import Settings
from app.drivers.base import Driver


def make_driver(settings: Settings) -> Driver:
    from app.drivers.instrumented import Instrumented

    if settings.driver == "nomad":
        from app.drivers.nomad import NomadDriver

        return Instrumented(NomadDriver(settings))
    from app.drivers.local import LocalDriver

    return Instrumented(LocalDriver(settings))
