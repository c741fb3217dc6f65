"""The bench's minimal engine (issue 11): one process per engine that answers `GET /health`
and nothing else, so a fleet of 1,000 fits on a small machine (run with `python -S`: only the
socket module, a few MB each). Not the engine contract: only what the reconciler looks at."""

import os
import socket

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def main() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((os.environ.get("ENGINE_HOST", "127.0.0.1"), int(os.environ["ENGINE_PORT"])))
    server.listen(64)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(ANSWER)
            except OSError:
                pass


if __name__ == "__main__":
    main()
