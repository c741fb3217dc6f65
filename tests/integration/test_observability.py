"""/metrics, /healthz, /readyz and the JSON logs."""

from __future__ import annotations

import json
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Orchestrator


def scrape(orch: Orchestrator) -> dict[tuple[str, tuple], float]:
    text = httpx.get(orch.url + "/metrics", trust_env=False).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_after_provision_and_refused_admit(orch: Orchestrator) -> None:
    orch.product("tiny", max_engines=1)
    api = orch.client("tiny")
    before = scrape(orch)
    assert api.post("/engines/provision", json={"user_id": "m1"}).status_code == 200
    refused = api.post("/engines/m2/admit", json={"auto_provision": True})
    assert refused.status_code == 429
    after = scrape(orch)
    route = "/engines/provision"
    assert value(after, "orch_requests_total", route=route, method="POST", status="200") == \
        value(before, "orch_requests_total", route=route, method="POST", status="200") + 1
    assert value(after, "orch_refusals_total", reason="quota_exceeded") == \
        value(before, "orch_refusals_total", reason="quota_exceeded") + 1
    assert value(after, "orch_engines", product="tiny", state="running") == 1
    assert value(after, "orch_transitions_total", event="ready", to="running") >= 1
    assert value(after, "orch_operation_seconds_count", operation="provision", outcome="ok") >= 1
    assert value(after, "orch_admit_seconds_count", outcome="quota_exceeded") >= 1
    assert value(after, "orch_driver_call_seconds_count", driver="local", call="create") >= 1
    assert value(after, "orch_boot_seconds_count") >= 1
    # user ids never become label values
    assert not any("m1" in str(labels) for _, labels in after)


def test_health_endpoints_need_no_key(orch: Orchestrator) -> None:
    assert httpx.get(orch.url + "/healthz", trust_env=False).json() == {"status": "ok"}
    ready = httpx.get(orch.url + "/readyz", trust_env=False)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_logs_are_json_and_never_hold_a_key(orch: Orchestrator) -> None:
    api = orch.client("acme")
    created = api.post("/engines/provision", json={"user_id": "logged"}).json()
    rotated = api.post("/engines/logged/rotate-key").json()
    api.post("/engines/logged/admit", headers={"X-Request-ID": "trace-me"})
    api.get("/engines/nobody")
    orch.kill(signal.SIGTERM)  # a graceful stop flushes the buffered request lines
    lines = [line for line in orch.log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    requests = [r for r in records if r["msg"] == "request"]
    assert any(r.get("request_id") == "trace-me" and r["route"] == "/engines/{user_id}/admit"
               and r["product"] == "acme" and r["user_id"] == "logged" and "duration_ms" in r
               for r in requests)
    transitions = [r for r in records if r["msg"] == "transition"]
    assert any(r["event"] == "ready" and r["to"] == "running" for r in transitions)
    text = orch.log.read_text()
    for secret in (created["api_key"], rotated["api_key"], orch.keys["acme"]):
        assert secret not in text


def test_metrics_need_the_token_when_one_is_set(tmp_path) -> None:
    from tests.harness import running

    with running(tmp_path, env={"ORCH_METRICS_TOKEN": "s3cret-token"}) as orch:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            refused = httpx.get(orch.url + "/metrics", headers=headers, trust_env=False)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "UNAUTHORIZED"
            assert "orch_requests_total" not in refused.text
        allowed = httpx.get(orch.url + "/metrics", trust_env=False,
                            headers={"Authorization": "Bearer s3cret-token"})
        assert allowed.status_code == 200 and "orch_requests_total" in allowed.text
        assert httpx.get(orch.url + "/healthz", trust_env=False).status_code == 200  # no token


def test_every_answer_has_a_request_id_and_unrouted_paths_are_labelled_as_such(orch: Orchestrator) -> None:
    for path in ("/healthz", "/nope", "/engines/a%2Fb", "/openapi.json", "/docs"):
        assert httpx.get(orch.url + path, trust_env=False).headers["x-request-id"]
    samples = scrape(orch)
    assert value(samples, "orch_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert value(samples, "orch_requests_total", route="/healthz", method="GET", status="200") >= 1
