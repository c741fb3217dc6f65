"""BENCH_ONLY=edge: BENCH_EDGE_SLOW (1000) slow clients against `orch serve` at its default
limits (ORCH_LIMIT_CONCURRENCY 1000, head and body timeouts 10 s), beside /healthz probed alone.

Half the slow clients send a request head a byte every 2 s, half a keyed POST whose body comes
a byte every 2 s; each reconnects as soon as the server closes it, so BENCH_EDGE_SLOW of them
are always at the server. Throughout, for BENCH_EDGE_SECONDS (30), /healthz is probed on a new
connection every 0.2 s with a 1 s bound. Measured: the probes' p50/p99/worst and how many were
not a 200 within the second; the same probes with no slow client are the baseline.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tests.harness import Orchestrator

SLOW = int(os.environ.get("BENCH_EDGE_SLOW", "1000"))
SECONDS = float(os.environ.get("BENCH_EDGE_SECONDS", "30"))
BASELINE_S = 5.0
PROBE_EVERY_S = 0.2
TRICKLE_S = 2.0


def bench_edge(tmp: Path) -> dict:
    orch = Orchestrator(tmp, env={"ORCH_LOG_LEVEL": "WARNING"}, ports=2).start()
    try:
        key = orch.product("bench")
        return asyncio.run(_measure(orch.port, key))
    finally:
        orch.close()


async def _measure(port: int, key: str) -> dict:
    baseline = await _probes(port, BASELINE_S)
    stop = asyncio.Event()
    stats = {"connections": 0, "refused": 0, "closed": 0}
    slow = [asyncio.create_task(_slow_client(port, key, i % 2 == 0, stop, stats))
            for i in range(SLOW)]
    await asyncio.sleep(TRICKLE_S)  # every slow client connected and waiting
    under = await _probes(port, SECONDS)
    stop.set()
    await asyncio.gather(*slow, return_exceptions=True)
    return {"slow": SLOW, "seconds": SECONDS, "baseline": baseline, "under": under, **stats}


async def _slow_client(port: int, key: str, head: bool, stop: asyncio.Event,
                       stats: dict[str, int]) -> None:
    start = (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " if head else
             b"POST /engines/slow/admit HTTP/1.1\r\nHost: t\r\nX-Platform-Key: " + key.encode()
             + b"\r\nContent-Length: 100\r\n\r\n{")
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        stats["connections"] += 1
        try:
            writer.write(start)
            while not stop.is_set():
                answer = await _read_or_wait(reader, TRICKLE_S)
                if answer is not None:  # answered (a refusal) or closed by the server
                    stats["refused" if answer else "closed"] += 1
                    break
                writer.write(b"a")
                await writer.drain()
        except OSError:
            stats["closed"] += 1
        finally:
            writer.close()


async def _read_or_wait(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    try:
        return await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return None


async def _probes(port: int, seconds: float) -> dict:
    samples: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        ok = await _probe(port)
        samples.append(time.perf_counter() - started)
        failed += not ok
        await asyncio.sleep(PROBE_EVERY_S)
    ordered = sorted(samples)
    return {"probes": len(ordered), "failed": failed,
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


async def _probe(port: int) -> bool:
    """/healthz answered 200 within a second, on a new connection."""
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                return (await reader.read(65536)).startswith(b"HTTP/1.1 200 ")
            finally:
                writer.close()
    except (TimeoutError, OSError):
        return False


def lines(r: dict) -> list[str]:
    b, u = r["baseline"], r["under"]
    return [f"slow clients       {r['slow']} held for {r['seconds']:.0f} s "
            f"({r['connections']} connections: {r['refused']} refused, {r['closed']} closed)",
            f"  /healthz         p50 {u['p50_ms']} ms   p99 {u['p99_ms']} ms   worst {u['max_ms']} ms   "
            f"not 200 within 1 s: {u['failed']} of {u['probes']}   "
            f"alone p50 {b['p50_ms']} ms   p99 {b['p99_ms']} ms   (target: none failed)"]
