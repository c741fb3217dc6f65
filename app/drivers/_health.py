"""The local driver's periodic health check, on a bare non-blocking socket (issue 11).

A fleet's health checks are most of the reconciler's work at rest. Through httpx one cost
about 1.5 ms of CPU here (its pool, its async-library detection, its models); this one
connects, sends one HTTP/1.0 request, reads the status line and closes: a fraction of that.
The whole exchange has one deadline, so an engine that dribbles bytes cannot hold it.
"""

from __future__ import annotations

import asyncio
import socket

_REQUEST = b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
_MAX_HEAD = 1024


async def healthy(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when GET /health answers 200 within `timeout`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, _REQUEST)
            head = b""
            while b"\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = await loop.sock_recv(sock, _MAX_HEAD)
                if not chunk:
                    break
                head += chunk
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    status = head.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1] == b"200"
