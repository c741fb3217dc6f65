"""A small HTTP/1.1 load generator: raw asyncio sockets, keep-alive, one process.

Closed loop (`saturate`): C connections send back-to-back for D seconds -> requests/s.
Open loop (`paced`): requests are scheduled at a fixed rate and latency is measured from the
scheduled time, so a slow server cannot hide its queueing (no coordinated omission).
Run it in its own process (see `run_in_process`) so it has a core of its own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
from dataclasses import dataclass


@dataclass
class Target:
    host: str
    port: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def raw(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(self.body)}", "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def saturate(target: Target, connections: int, seconds: float) -> dict:
    raw = target.raw()
    deadline = time.perf_counter() + seconds
    counts = {"ok": 0, "bad": 0}
    latencies: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = await _exchange(reader, writer, raw)
            latencies.append(time.perf_counter() - started)
            counts["ok" if status < 400 else "bad"] += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"rps": counts["ok"] / elapsed, "errors": counts["bad"], **_percentiles(latencies)}


async def paced(target: Target, connections: int, rate: float, seconds: float) -> dict:
    raw = target.raw()
    total = int(rate * seconds)
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    bad = 0

    async def worker() -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection(target.host, target.port)
        while (scheduled := await queue.get()) is not None:
            status = await _exchange(reader, writer, raw)
            latencies.append(time.perf_counter() - scheduled)
            bad += status >= 400
        writer.close()

    async def pacer() -> None:
        start = time.perf_counter() + 0.05
        for i in range(total):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(at)
        for _ in range(connections):
            queue.put_nowait(None)

    await asyncio.gather(pacer(), *(worker() for _ in range(connections)))
    return {"rate": rate, "errors": bad, **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    ordered = sorted(latencies)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)  # noqa: E731
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "n": len(ordered)}


def _child(conn, mode: str, target: Target, kwargs: dict) -> None:  # type: ignore[no-untyped-def]
    fn = saturate if mode == "saturate" else paced
    conn.send(asyncio.run(fn(target, **kwargs)))
    conn.close()


def run_in_process(mode: str, target: Target, **kwargs: float) -> dict:
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_child, args=(child, mode, target, kwargs))
    proc.start()
    result = parent.recv()
    proc.join(timeout=30)
    return result


if __name__ == "__main__":
    import sys

    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(asyncio.run(saturate(Target(host, port, "GET", path, {}), 16, 3.0))))
