"""Conformance: schemathesis, from our own OpenAPI document, against the live server.

Every operation of /openapi.json gets generated requests, valid (positive) and invalid
(negative), sent to a real `orch serve` with a product whose quota lets provisions through,
so the lifecycle is reached (engines really start, stop and go). Each answer must:
- be a status the document names for that operation (a 5xx too: 503 PORT_EXHAUSTION is
  named for provision, a 500 never is);
- match the document's schema and content type;
- reject invalid input with a 4xx.
Bounded: FUZZ_EXAMPLES examples per operation (default 50, about 30 s here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.openapi import document
from tests.harness import Orchestrator, running

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with running(tmp, product=None, ports=4, env={"ORCH_BOOT_TIMEOUT_S": "5"}) as orch:
        orch.product("fuzz", max_engines=3)
        yield orch


# The document the code builds; the live server's /openapi.json must be the same one
# (schemathesis' lazy fixture loader does not run under this pytest, so the schema is loaded
# at collection, when no server runs yet).
schema = schemathesis.openapi.from_dict(document())


def test_the_server_serves_the_document_fuzzed_here(live: Orchestrator) -> None:
    assert httpx.get(live.url + "/openapi.json", trust_env=False).json() == document()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case, live: Orchestrator) -> None:
    headers = {"X-Platform-Key": live.keys["fuzz"]}
    response = case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS,
                                      timeout=30)
    documented = case.operation.definition.raw["responses"]
    assert response.status_code < 500 or str(response.status_code) in documented, \
        f"{case.operation.label}: {response.status_code} is not named for this call: {response.text[:300]}"
    assert response.headers.get("x-request-id"), "every answer has X-Request-ID"


def test_the_fuzzing_reached_the_lifecycle_and_the_checks(live: Orchestrator) -> None:
    """Runs after the fuzzing (file order): it provisioned engines and was refused too."""
    events = {kind for (kind,) in live.rows("SELECT DISTINCT event FROM event")}
    assert "provision" in events, events
    text = httpx.get(live.url + "/metrics", trust_env=False).text
    assert 'route="/engines/provision",status="200"' in text
    print("\n".join(line for line in text.splitlines() if line.startswith("orch_requests_total")))
    assert 'route="/engines/{user_id}/admit",status="400"' in text  # negative cases too
