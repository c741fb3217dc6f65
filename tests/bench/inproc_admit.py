"""In-process cost of one admit of a running engine beside the bare Starlette endpoint: each
ASGI application called directly (no sockets, no uvicorn), process CPU time per request, the
best of interleaved rounds (the machine is shared). Ours includes settling its access-log
lines and metrics (as the server's flush does every 100 ms), not writing them out.

    python -m tests.bench.inproc_admit [requests per round] [--profile]

Not part of `make bench`, which measures over real sockets; this is where app/DESIGN.md's
in-process breakdown of admit's time comes from (--profile: cProfile of ours).
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app import crypto, products, registry
from app.api.app import OrchestratorApp
from app.api.handlers import Services
from app.operations import Op, ProductRef
from tests.bench import bare
from tests.inproc import World

PATH = "/engines/hot/admit"
ROUNDS = 15


def _scope(key: str | None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"),
               (b"content-type", b"application/json"), (b"content-length", b"2")]
    if key is not None:
        headers.append((b"x-platform-key", key.encode()))
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555),
            "scheme": "http", "method": "POST", "root_path": "", "path": PATH,
            "raw_path": PATH.encode(), "query_string": b"", "headers": headers, "state": {}}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


class _Sink:
    def __init__(self) -> None:
        self.statuses: set[int] = set()

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses.add(message["status"])


def _nothing() -> None:
    """Stands in for AccessLog.settle in a checkout without it (to measure another commit)."""


async def _round(app: Any, key: str | None, n: int, orch: OrchestratorApp | None) -> float:
    """CPU seconds per request over n requests."""
    sink = _Sink()
    started = time.process_time()
    for i in range(n):
        await app(_scope(key), _receive, sink)
        if orch is not None and i % 1000 == 999:
            getattr(orch.access_log, "settle", _nothing)()  # what the flush task does
    if orch is not None:
        getattr(orch.access_log, "settle", _nothing)()
    spent = (time.process_time() - started) / n
    if orch is not None:
        for made in ("_lines", "_buffer"):  # the lines are made, not written (either version)
            getattr(orch.access_log, made, bytearray()).clear()
    assert sink.statuses == {200}, sink.statuses
    return spent


async def measure(orch: OrchestratorApp, key: str, n: int) -> tuple[float, float]:
    ours = base = float("inf")
    for _ in range(ROUNDS):
        ours = min(ours, await _round(orch, key, n, orch))
        base = min(base, await _round(bare.app, None, n, None))
    return ours, base


def main() -> None:
    n = next((int(a) for a in sys.argv[1:] if a.isdigit()), 2000)
    world = World(Path(tempfile.mkdtemp(prefix="orch-inproc-")))
    _, key = products.create("bench", max_engines=10, rate_limit_rpm=1_000_000_000)
    row: Any = registry.product_by_key_hash(crypto.hash_key(key))
    product = ProductRef(row.id, row.name, row.max_engines, row.rate_limit_rpm)

    async def run() -> None:
        await world.engines.run(Op.PROVISION, (product.id, "hot"), product_name=product.name)
        orch = OrchestratorApp(world.settings, run_reconciler=False)
        orch.services = Services(world.engines, world.admitter)
        orch.access_log.enabled = True  # as deployed (INFO)
        await _round(orch, key, n, orch)  # warm-up
        ours, base = await measure(orch, key, n)
        print(f"admit in process: ours {ours * 1e6:.1f} us, bare {base * 1e6:.1f} us "
              f"(best of {ROUNDS} rounds of {n}), ratio {base / ours:.2f}")
        if "--profile" in sys.argv:
            profiler = cProfile.Profile()
            profiler.enable()
            await _round(orch, key, n * 5, orch)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        await world.engines.runner.drain(10.0)
        await world.engines.close()

    asyncio.run(run())
    world.close()


if __name__ == "__main__":
    main()
