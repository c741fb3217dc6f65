"""JSON log lines: one per request and one per state transition. Never a key: messages pass
through a filter that masks anything shaped like a platform or engine key."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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
    """One JSON line per request. Written to a buffer that is flushed to stderr every
    FLUSH_S (and at shutdown), not through the logging module: its record, formatter, handler
    lock and a syscall per line cost more than the admit itself. A SIGKILL can lose the last
    FLUSH_S of request lines; transitions go through logging and are written at once.
    The fields are ours (no key can be among them), so the key filter is not needed here."""

    FLUSH_S = 0.1

    def __init__(self, level: str) -> None:
        self.enabled = logging.getLevelName(level) <= logging.INFO
        # One growing buffer, not a list of lines: a thousand small bytes objects kept alive
        # until the flush cost ~2.5 us each to allocate (measured), the appends ~0.5 us.
        self._buffer = bytearray()

    def request(self, request_id: str, product: str | None, user_id: str | None, method: str,
                route: str, status: int, outcome: str, duration_ms: float) -> None:
        """One request line: its dict built in one go, as one JSON line in the buffer."""
        if self.enabled:
            self._buffer += orjson.dumps({
                "request_id": request_id, "product": product, "user_id": user_id,
                "method": method, "route": route, "status": status, "outcome": outcome,
                "duration_ms": duration_ms, "ts": round(time.time(), 3), "level": "INFO",
                "logger": "orch.requests", "msg": "request"}, option=_LINE)

    def flush(self) -> None:
        if self._buffer:
            lines, self._buffer = self._buffer, bytearray()
            sys.stderr.buffer.write(lines)
            sys.stderr.flush()


_transitions = logging.getLogger("orch.transitions")


def _log_transition(change: registry.Transition) -> None:
    """One line per state change, written at once (not buffered like request lines)."""
    _transitions.info("transition", extra={
        "engine": change.engine, "user_id": change.user_id, "event": change.event,
        "from": change.from_status, "to": change.to_status, "reason": change.reason,
        "request_id": change.request_id})


registry.subscribe(_log_transition)
