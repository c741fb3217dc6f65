"""The access log's batched lines and metrics (app/logs.py, app/api/middleware.py): every
line is one valid JSON object whatever the client sent, and a scrape counts every request
answered before it, though lines and counts are settled in batches."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest

from app import metrics
from app.api.middleware import RequestContext
from app.logs import AccessLog


def _lines(log: AccessLog, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(out, write_through=True))
    log.flush()
    return [json.loads(line) for line in out.getvalue().decode().splitlines()]


@pytest.mark.parametrize("awkward", ['quo"te', "back\\slash", "tab\there", "nul\x00",
                                     "ünï😀", "\u2028", "\ud800"])
def test_a_line_is_valid_json_whatever_the_ids_hold(
        awkward: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AccessLog("INFO")
    log.line(awkward, None, awkward, "POST", "/engines/{user_id}/admit", 200, "ok", 0.0012345,
             1700000000.12345)
    (line,) = _lines(log, monkeypatch)
    assert line["request_id"] == awkward and line["user_id"] == awkward
    assert line["product"] is None
    assert (line["status"], line["outcome"], line["duration_ms"], line["ts"]) == \
        (200, "ok", 1.234, 1700000000.123)
    assert (line["level"], line["logger"], line["msg"]) == ("INFO", "orch.requests", "request")


def test_records_are_settled_into_lines_at_the_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    log = AccessLog("INFO")
    RequestContext(lambda *_: None, log)  # type: ignore[arg-type, return-value]
    log.pending.append(("rid-1", "acme", "bob", "POST", "/engines/{user_id}/admit", 200, None,
                        "denied", 0.002, 5.0))
    log.pending.append(("rid-2", None, None, "GET", "unmatched", 404, "NOT_FOUND", None, 0.001,
                        6.0))
    lines = _lines(log, monkeypatch)
    assert [(x["request_id"], x["outcome"], x["status"]) for x in lines] == \
        [("rid-1", "ok", 200), ("rid-2", "NOT_FOUND", 404)]
    assert lines[1]["ts"] - lines[0]["ts"] == pytest.approx(1.0, abs=0.002)
    assert not log.pending


def test_a_scrape_counts_every_answered_request() -> None:
    log = AccessLog("WARNING")  # no lines: the metrics are settled all the same
    RequestContext(lambda *_: None, log)  # type: ignore[arg-type, return-value]
    route = "/engines/{user_id}/test-scrape"

    def count() -> float:
        for family in metrics.PER_REQUEST.collect():
            for sample in family.samples:
                if sample.labels.get("route") == route and sample.name.endswith("_total"):
                    return sample.value
        return 0.0

    before = count()
    refused_before = metrics.REFUSALS.labels("quota_exceeded")._value.get()
    for _ in range(3):
        log.pending.append(("r", "acme", "bob", "POST", route, 429, "QUOTA_EXCEEDED", None,
                            0.001, 1.0))
    assert b'orch_refusals_total{reason="quota_exceeded"} %d' % (refused_before + 3) in \
        metrics.exposition().replace(b".0\n", b"\n")
    assert count() == before + 3
    assert not log.pending


def test_the_flush_is_armed_by_a_record_not_run_on_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """At rest nothing is armed (no wake-ups); the first record of a batch arms one flush,
    FLUSH_S later, that writes the whole batch; the next record arms the next one."""
    import asyncio

    out = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(out, write_through=True))
    log = AccessLog("INFO")
    RequestContext(lambda *_: None, log)  # type: ignore[arg-type, return-value]
    record = ("rid", "acme", "bob", "POST", "/engines/{user_id}/admit", 200, None, None, 0.001, 1.0)

    async def scenario() -> list[int]:
        written = []
        loop = asyncio.get_running_loop()
        assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        log.record(record)
        log.record(record)
        armed = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        assert len(armed) == 1
        written.append(out.getvalue().count(b"\n"))  # nothing yet: the batch waits
        await asyncio.sleep(log.FLUSH_S * 2)
        written.append(out.getvalue().count(b"\n"))
        log.record(record)
        log.close()  # shutdown writes what is pending and leaves no timer behind
        written.append(out.getvalue().count(b"\n"))
        assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return written

    assert asyncio.run(scenario()) == [0, 2, 3]
