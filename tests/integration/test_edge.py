"""The HTTP edge (app/api/edge.py), probed with raw sockets as a hostile client would: slow
bodies, pipelining, malformed requests, odd HTTP versions, the concurrency limit, and streamed
answers to HTTP/1.0 clients. Every refusal must be the contract's JSON error with an
X-Request-ID; no slow client may hold a slot past its timeout or keep others out."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Orchestrator, read_until_closed, running

TIMEOUT = "1"  # ORCH_HEAD_TIMEOUT_S and ORCH_BODY_TIMEOUT_S here: short, so tests are quick
WAIT = 10.0  # a bound on every read: well past the timeouts above, far below the 30 s keep-alive


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    env = {"ORCH_HEAD_TIMEOUT_S": TIMEOUT, "ORCH_BODY_TIMEOUT_S": TIMEOUT}
    with running(tmp_path_factory.mktemp("edge"), env=env, ports=4) as orch:
        yield orch


def connect(orch: Orchestrator) -> socket.socket:
    return socket.create_connection(("127.0.0.1", orch.port), timeout=WAIT)


def answers(data: bytes) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """The Content-Length answers in `data`, in order: (status, headers, body)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers[b"content-length"][0])
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return found


def assert_refusal(data: bytes, status: int, code: str) -> dict[bytes, list[bytes]]:
    """One answer, the contract's error, and the connection closed after it."""
    [(got, headers, body)] = answers(data)
    assert got == status, data
    assert headers[b"content-type"] == [b"application/json"], data
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    assert headers[b"x-request-id"] == [error["request_id"].encode()], data
    assert headers[b"connection"] == [b"close"], data
    return headers


def key_header(orch: Orchestrator) -> bytes:
    return b"X-Platform-Key: " + orch.keys["acme"].encode() + b"\r\n"


# ---- time: slow bodies and heads -------------------------------------------------------------


def test_a_body_that_does_not_arrive_in_time_is_answered_408(edge: Orchestrator) -> None:
    with connect(edge) as short, connect(edge) as trickle:
        short.sendall(b"POST /engines/bob/admit HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n"
                      + key_header(edge) + b"\r\n{")
        trickle.sendall(b"POST /engines/provision HTTP/1.1\r\nHost: t\r\n" + key_header(edge)
                        + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # 6 bytes at a time, for longer than the timeout in all
            trickle.sendall(b"1\r\n{\r\n")
            time.sleep(0.4)
        assert_refusal(read_until_closed(short), 408, "REQUEST_TIMEOUT")
        assert_refusal(read_until_closed(trickle), 408, "REQUEST_TIMEOUT")
    assert edge.rows("SELECT user_id FROM engine") == []


def test_an_answer_given_before_the_body_does_not_keep_the_connection(edge: Orchestrator) -> None:
    with connect(edge) as sock:  # no key: answered 401 at once, then closed, trickle or not
        sock.sendall(b"POST /engines/provision HTTP/1.1\r\nHost: t\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            sock.sendall(b"1\r\n{\r\n")
            time.sleep(0.4)
        data = read_until_closed(sock)
    [(status, _, body)] = answers(data)
    assert status == 401 and json.loads(body)["error"]["code"] == "UNAUTHORIZED"


def test_a_partial_head_on_a_kept_alive_connection_gets_the_head_timeout(edge: Orchestrator) -> None:
    for together in (False, True):  # the partial head after the answer, or in the same write
        with connect(edge) as sock:
            whole = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            partial = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "
            sock.sendall(whole + partial if together else whole)
            first = b""
            while not first.endswith(b"}"):  # the whole answer, a small JSON object
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first
            if not together:
                sock.sendall(partial)
            started = time.monotonic()
            assert read_until_closed(sock) == b""  # closed, not left open for the 30 s keep-alive
            assert time.monotonic() - started < WAIT - 1


def test_past_the_limit_slow_clients_are_refused_not_everyone(tmp_path: Path) -> None:
    env = {"ORCH_LIMIT_CONCURRENCY": "20", "ORCH_BODY_TIMEOUT_S": "60", "ORCH_HEAD_TIMEOUT_S": "60"}
    with running(tmp_path, env=env, ports=2) as orch:
        slow = [connect(orch) for _ in range(25)]
        try:
            for i, sock in enumerate(slow):
                if i % 2:  # half of them inside a body, half inside a head
                    sock.sendall(b"POST /engines/provision HTTP/1.1\r\nHost: t\r\n"
                                 + key_header(orch) + b"Content-Length: 10\r\n\r\n{")
                else:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            time.sleep(0.5)  # every one is read by the server before the probes
            for _ in range(5):
                got = httpx.get(orch.url + "/healthz", timeout=WAIT, trust_env=False)
                assert got.status_code == 200, got.text
            # The slow ones made room: the oldest were closed, or refused in the contract's shape.
            readable, _, _ = select.select(slow, [], [], WAIT)
            time.sleep(0.5)  # let every closing connection's last bytes arrive
            readable, _, _ = select.select(slow, [], [], 0)
            assert len(readable) >= 25 - 20, len(readable)
            for sock in readable:
                data = read_until_closed(sock)
                assert data == b"" or assert_refusal(data, 503, "SERVER_BUSY")[b"retry-after"]
            assert slow[0] in readable  # the one that waited longest
        finally:
            for sock in slow:
                sock.close()


def test_past_the_limit_with_no_slow_client_the_new_request_is_refused_503(tmp_path: Path) -> None:
    with running(tmp_path, env={"ORCH_LIMIT_CONCURRENCY": "2"}, ports=2) as orch:
        # Two event streams: the server's own work, not clients to wait on.
        streams = [connect(orch), connect(orch)]
        try:
            for sock in streams:
                sock.sendall(b"GET /engines/s/events?follow=true HTTP/1.1\r\nHost: t\r\n"
                             + key_header(orch) + b"\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            with connect(orch) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                headers = assert_refusal(read_until_closed(sock), 503, "SERVER_BUSY")
            assert headers[b"retry-after"] == [b"1"]
        finally:
            for sock in streams:
                sock.close()
        assert httpx.get(orch.url + "/healthz", timeout=WAIT, trust_env=False).status_code == 200


# ---- pipelining --------------------------------------------------------------------------------


def test_a_malformed_request_pipelined_after_a_valid_one_loses_no_answer(edge: Orchestrator) -> None:
    body = b'{"user_id": "piped"}'
    with connect(edge) as sock:
        sock.settimeout(60)  # the provision boots a real engine
        sock.sendall(b"POST /engines/provision HTTP/1.1\r\nHost: t\r\n" + key_header(edge)
                     + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                     + b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        data = read_until_closed(sock)
    (status, _, provisioned), refusal = answers(data)[0], data[data.index(b"HTTP/1.1 400"):]
    assert status == 200 and json.loads(provisioned)["api_key"], data
    assert_refusal(refusal, 400, "INVALID_REQUEST")


def test_a_malformed_request_pipelined_before_a_valid_one_stops_it(edge: Orchestrator) -> None:
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n"
                     b"POST /engines/provision HTTP/1.1\r\nHost: t\r\n" + key_header(edge)
                     + b'Content-Length: 19\r\n\r\n{"user_id": "never"}')
        assert_refusal(read_until_closed(sock), 400, "INVALID_REQUEST")
    assert edge.rows("SELECT user_id FROM engine WHERE user_id = 'never'") == []


# ---- one error shape from below the handlers --------------------------------------------------

MALFORMED = {
    "bare LF in a header": b"GET /healthz HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    "obs-fold": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: b\x00c\r\n\r\n",
    "a header line with no colon": b"GET /healthz HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n",
    "two Content-Lengths": b"POST /engines/x/stop HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n"
                           b"Content-Length: 2\r\n\r\nab",
    "Content-Length and Transfer-Encoding": b"POST /engines/x/stop HTTP/1.1\r\nHost: t\r\n"
                                            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
                                            b"\r\n0\r\n\r\n",
    "a bad chunk size": b"POST /engines/x/stop HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                        b"\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "a lowercase method": b"get /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    "an unknown method": b"BREW /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    "raw non-ASCII in the path": "GET /engines/é HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_the_contracts_error(edge: Orchestrator, request_bytes: bytes) -> None:
    with connect(edge) as sock:
        sock.sendall(request_bytes)
        assert_refusal(read_until_closed(sock), 400, "INVALID_REQUEST")


def test_a_head_over_64_kib_gets_the_contracts_error(edge: Orchestrator) -> None:
    with connect(edge) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the whole head is sent
        assert_refusal(read_until_closed(sock), 431, "HEADERS_TOO_LARGE")


def test_edge_refusals_are_counted_and_logged(edge: Orchestrator) -> None:
    """No route runs for them, so the edge itself tells the operator: a metric by error code
    and a request line naming the request id the client was given."""
    def counted(name: str, label: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{edge.port}/metrics", trust_env=False).text
        line = next((line for line in text.splitlines() if line.startswith(f"{name}{{{label}}} ")), "")
        return float(line.split()[-1]) if line else 0.0

    refused = 'orch_edge_refusals_total', 'code="HEADERS_TOO_LARGE"'
    closed = 'orch_edge_closes_total', 'why="head_timeout"'
    before = counted(*refused), counted(*closed)
    with connect(edge) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the whole head is sent
        headers = assert_refusal(read_until_closed(sock), 431, "HEADERS_TOO_LARGE")
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")   # a head that never ends: closed
        assert read_until_closed(sock) == b""
    assert (counted(*refused), counted(*closed)) == (before[0] + 1, before[1] + 1)
    rid = headers[b"x-request-id"][0].decode()
    lines = [json.loads(line) for line in edge.log.read_text().splitlines()
             if line.startswith("{") and rid in line]
    assert [(x["logger"], x["status"], x["outcome"]) for x in lines] == \
        [("orch.requests", 431, "HEADERS_TOO_LARGE")]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
def test_other_http_versions_are_refused_with_505(edge: Orchestrator, version: bytes) -> None:
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz " + version + b"\r\nHost: t\r\nX-Request-ID: mine\r\n\r\n")
        data = read_until_closed(sock)
    assert_refusal(data, 505, "HTTP_VERSION_NOT_SUPPORTED")
    assert b"x-request-id: mine\r\n" in data


def test_duplicate_keys_in_a_json_body_are_refused(edge: Orchestrator) -> None:
    response = edge.client("acme").post(
        "/engines/dup/admit", content=b'{"auto_provision": false, "auto_provision": true}',
        headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST"
    assert "auto_provision" in response.json()["error"]["message"]
    assert edge.rows("SELECT user_id FROM engine WHERE user_id = 'dup'") == []


# ---- streamed answers (events?follow=true) ------------------------------------------------------


def stream_head(orch: Orchestrator, version: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    """The head of a follow=true stream, and the bytes after it up to the first event."""
    with connect(orch) as sock:
        sock.sendall(b"GET /engines/streamed/events?follow=true " + version + b"\r\nHost: t\r\n"
                     + key_header(orch) + extra + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        return head.lower(), rest


def test_a_stream_to_an_http_1_0_client_is_close_delimited(edge: Orchestrator) -> None:
    head, _ = stream_head(edge, b"HTTP/1.0")
    assert head.startswith(b"http/1.1 200 ")
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert head.count(b"\r\nconnection:") == 1 and b"\r\nconnection: close" in head


def test_a_stream_has_one_connection_header(edge: Orchestrator) -> None:
    closing, _ = stream_head(edge, b"HTTP/1.1", b"Connection: close\r\n")
    assert closing.count(b"\r\nconnection:") == 1 and b"\r\nconnection: close" in closing
    kept, _ = stream_head(edge, b"HTTP/1.1")
    assert kept.count(b"\r\nconnection:") <= 1 and b"connection: close" not in kept
    assert b"transfer-encoding: chunked" in kept
