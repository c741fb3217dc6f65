"""The `orch` script's entry point. `pip install engine-orchestrator` alone gives the Python
client, which needs httpx only; the `orch` commands need the server's libraries (the `server`
extra). Without them, one line says so instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from app.cli import main as orch
    except ModuleNotFoundError as exc:
        if (exc.name or "app").startswith("app"):
            raise  # a module of ours missing is a bug, not an install choice
        print(f"orch: {exc.name} is not installed; the orch command needs the server's "
              "libraries: pip install 'engine-orchestrator[server]'", file=sys.stderr)
        return 2
    return orch()
