"""JSON log lines: one per request and one per state transition. Never a key: messages pass
through a filter that masks anything shaped like a platform or engine key."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import orjson

from app import registry

_LINE = orjson.OPT_APPEND_NEWLINE
KEY_SHAPE = re.compile(r"(orch_pk_|eng_)[A-Za-z0-9_-]{8,}")
FIELDS = ("request_id", "product", "user_id", "engine", "operation", "event", "from", "to",
          "reason", "outcome", "status", "method", "route", "duration_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return KEY_SHAPE.sub(r"\1[redacted]", json.dumps(line, default=str))


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx", "httpcore", "peewee", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class AccessLog:
    """One JSON line per request, and the per-request metrics, done in batches.

    A request that is answered only queues its record (a tuple, `record`). FLUSH_S after the
    first record of a batch (and at shutdown, and before /metrics is scraped) `settle()` hands
    the records to the settler (the request-context middleware: it counts the metrics and
    calls `line()`), and `flush()` writes the lines to stderr in one go. Done per request
    instead, the line and the metrics were ~40% of our own time on admit's hot path (measured
    in process). Not through the logging module: its record, formatter, handler lock and a
    syscall per line cost more than the admit itself. A SIGKILL can lose the last FLUSH_S of
    request lines; transitions go through logging and are written at once.
    The fields are ours or checked (no key can be among them), so the key filter is not
    needed here. The flush is armed by the first record after a quiet spell, not run on a
    timer: an orchestrator at rest does not wake up ten times a second for it."""

    FLUSH_S = 0.1

    def __init__(self, level: str) -> None:
        self.enabled = logging.getLevelName(level) <= logging.INFO
        self.pending: list[Any] = []
        self._settler: Callable[[list[Any]], None] | None = None
        self._lines: list[str] = []  # joined and written by flush()
        self._timer: asyncio.TimerHandle | None = None

    def record(self, answered: Any) -> None:
        """Queue one answered request; the first of a batch arms the flush."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._flush_due)
        self.pending.append(answered)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def settle_with(self, settler: Callable[[list[Any]], None]) -> None:
        self._settler = settler

    def settle(self) -> None:
        if self.pending and self._settler is not None:
            records = self.pending.copy()
            self.pending.clear()
            self._settler(records)

    def line(self, request_id: str, product: str | None, user_id: str | None, method: str,
             route: str, status: int, outcome: str, duration_s: float, ts: float) -> None:
        """One request line. An f-string, not a dict through orjson.dumps: about half the
        cost. `route`, `outcome`, `method` and `product` cannot hold a character JSON
        escapes (the table's patterns, the error codes, an HTTP token, a checked product
        name); the request id and the user id are escaped when they need it."""
        if self.enabled:
            self._lines.append(
                f'{{"request_id":"{_escaped(request_id)}","product":'
                f'{"null" if product is None else _QUOTE + product + _QUOTE},"user_id":'
                f'{"null" if user_id is None else _QUOTE + _escaped(user_id) + _QUOTE},'
                f'"method":"{method}","route":"{route}","status":{status},"outcome":"{outcome}",'
                f'"duration_ms":{duration_s * 1000:.3f},"ts":{ts:.3f},"level":"INFO",'
                f'"logger":"orch.requests","msg":"request"}}\n')

    def flush(self) -> None:
        self.settle()
        if self._lines:
            lines = "".join(self._lines).encode()
            self._lines.clear()
            sys.stderr.buffer.write(lines)
            sys.stderr.flush()


_QUOTE = '"'


def _escaped(text: str) -> str:
    """`text` as the inside of a JSON string."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # nothing JSON escapes (no control characters, quotes or backslashes)
    return json.dumps(text)[1:-1]  # json, not orjson: it takes lone surrogates too


_transitions = logging.getLogger("orch.transitions")


def log_transition(change: registry.Transition) -> None:
    """One line per state change, written at once (not buffered like request lines).
    Subscribed to the registry's transitions at start-up (app.api.app)."""
    _transitions.info("transition", extra={
        "engine": change.engine, "user_id": change.user_id, "event": change.event,
        "from": change.from_status, "to": change.to_status, "reason": change.reason,
        "request_id": change.request_id})

