"""JSON log lines: one per request and one per state transition. Never a key: messages pass
through a filter that masks anything shaped like a platform or engine key."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
