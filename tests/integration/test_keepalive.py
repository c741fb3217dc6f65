"""A connection a client pool keeps idle is still open when the pool reuses it.

httpx keeps an idle connection for 5 s, uvicorn used to close one after 5 s: a request sent as
the server closed the connection failed with a disconnect (seen in the replica storms, where a
POST cannot simply be retried). The server now keeps idle connections ORCH_KEEPALIVE_S (30 s)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.harness import running

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _answer(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), or what came before the close."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            if len(body) >= length:
                return data
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_an_idle_connection_outlives_a_client_pools_expiry(tmp_path: Path) -> None:
    with running(tmp_path, product=None) as orch, \
            socket.create_connection(("127.0.0.1", orch.port), timeout=10) as sock:
        sock.sendall(REQUEST)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past httpx's keepalive_expiry (5 s), and uvicorn's old default
        sock.sendall(REQUEST)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
