"""The bench's minimal engine: one process per engine that answers `GET /health`
and nothing else, so a fleet of 1,000 fits on a small machine (run with `python -S`: only the
socket and selectors modules, a few MB each). Not the engine contract: only what the
reconciler looks at. HTTP/1.1 keep-alive, as the reference engine serves it (the orchestrator
keeps one connection per engine open for its checks); an HTTP/1.0 request is answered and
closed."""

import os
import selectors
import socket

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ANSWER_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
MAX_REQUEST = 8192


def main() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((os.environ.get("ENGINE_HOST", "127.0.0.1"), int(os.environ["ENGINE_PORT"])))
    server.listen(64)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                _accept(server, selector)
            else:
                _serve(key.fileobj, key.data, selector)  # type: ignore[arg-type]


def _accept(server: socket.socket, selector: selectors.BaseSelector) -> None:
    try:
        conn, _ = server.accept()
    except OSError:
        return
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    selector.register(conn, selectors.EVENT_READ, bytearray())


def _serve(conn: socket.socket, pending: bytearray, selector: selectors.BaseSelector) -> None:
    try:
        chunk = conn.recv(4096)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    pending += chunk
    keep = bool(chunk) and len(pending) <= MAX_REQUEST
    while keep and b"\r\n\r\n" in pending:
        head, _, rest = bytes(pending).partition(b"\r\n\r\n")
        pending[:] = rest
        lower = head.lower()
        keep = lower.split(b"\r\n", 1)[0].endswith(b" http/1.1") and b"connection: close" not in lower
        try:
            conn.sendall(ANSWER if keep else ANSWER_CLOSE)  # a few bytes: the buffer takes them
        except OSError:
            keep = False
    if not keep:
        selector.unregister(conn)
        conn.close()


if __name__ == "__main__":
    main()
