"""Conformance: schemathesis, from our own OpenAPI document, against the live server.

Every operation of /openapi.json gets generated requests, valid (positive) and invalid
(negative), sent to a real `orch serve` with a product whose quota lets provisions through,
so the lifecycle is reached (engines really start, stop and go). Each answer must:
- be a status the document names for that operation (a 5xx too: 503 PORT_EXHAUSTION is
  named for provision, a 500 never is);
- match the document's schema and content type;
- reject invalid input with a 4xx.
- accept every request the document calls valid: no "schema-valid request rejected" (the
  document's one rule in words, cursor not with follow=true, is taught in fuzz_hooks.py);
- never be a 5xx: the product's quota (429) is met before the ports run out.
Then stateful sequences follow the document's links (and the links schemathesis infers), so
calls meet engines that exist: rotate-key, stop and start answer 200 too.
Bounded and repeatable: FUZZ_EXAMPLES examples per operation (default 40), FUZZ_STATEFUL_EXAMPLES
(default 30) for the stateful run, a fixed seed for both.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, seed, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.openapi import document
from tests.harness import Orchestrator, running
from tests.integration import fuzz_hooks

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
# The operations fuzzed against this process's `live` orchestrator (pytest-xdist may run some
# of this module's items on another worker, each with its own `live`).
FUZZED: set[str] = set()
STATEFUL_EXAMPLES = int(os.environ.get("FUZZ_STATEFUL_EXAMPLES", "30"))
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, positive_data_acceptance]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # Ports for every engine the two quotas allow, and a boot timeout no loaded machine
    # reaches: a 5xx here is a finding, never the test's own setting.
    with running(tmp, product=None, ports=7, env={"ORCH_BOOT_TIMEOUT_S": "30"}) as orch:
        orch.product("fuzz", max_engines=3)
        orch.product("steps", max_engines=3)  # the stateful run's own product and quota
        yield orch


# The document the code builds; the live server's /openapi.json must be the same one
# (schemathesis' lazy fixture loader does not run under this pytest, so the schema is loaded
# at collection, when no server runs yet).
# A brain archive is sent as bytes like any other binary body. What the document calls valid
# is a tar archive (the media type says so; a schema cannot), so the generator makes real ones:
# any other bytes are invalid data, which the server rightly answers with 400.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


schemathesis.openapi.media_type("application/x-tar", st.lists(
    st.tuples(st.from_regex(r"\A[a-z0-9]{1,12}\Z"), st.binary(max_size=64)),
    max_size=3, unique_by=lambda f: f[0]).map(_tar))
schema = schemathesis.openapi.from_dict(document())


def test_the_server_serves_the_document_fuzzed_here(live: Orchestrator) -> None:
    assert httpx.get(live.url + "/openapi.json", trust_env=False).json() == document()


# One pytest item for every operation: about 90 s with three other workers on two cores.
@pytest.mark.timeout(600)
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@seed(19)
def test_every_operation_conforms(case: schemathesis.Case, live: Orchestrator) -> None:
    headers = {"X-Platform-Key": live.keys["fuzz"]}
    FUZZED.add(case.operation.label)
    assume(fuzz_hooks.filter_query(None, case.query))  # explicit examples skip the hook
    response = case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS,
                                      timeout=30)
    assert response.status_code < 500, \
        f"{case.operation.label}: {response.status_code}: {response.text[:300]}"
    assert response.headers.get("x-request-id"), "every answer has X-Request-ID"


def test_stateful_sequences_follow_the_links(live: Orchestrator, tmp_path: Path) -> None:
    """Sequences along links (ours from provision, and those schemathesis infers from
    GET /engines): calls on engines that exist, in whatever state the last call left them.
    Run by schemathesis' own runner: its state machine draws from the server's answers, which
    Hypothesis under pytest reports as a flaky strategy."""
    # Its sequences start from GET /engines (and start/stop), not from provision: engines
    # that exist give them something to follow.
    for user in ("seq-a", "seq-b"):
        assert live.client("steps").post("/engines/provision", json={"user_id": user}).status_code == 200
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", live.url + "/openapi.json",
               "--phases", "stateful", "--seed", "1", "--workers", "1", "--no-color",
               "-n", str(STATEFUL_EXAMPLES), "-H", f"X-Platform-Key: {live.keys['steps']}",
               "-c", ",".join(check.__name__ for check in CHECKS) + ",not_a_server_error",
               # Rollouts act on the product's whole fleet in the background: in these
               # sequences they would only upgrade the engines under them. They are fuzzed
               # operation by operation above, and tested in test_rollouts.py. A brain archive
               # (application/x-tar) needs the serializer registered in this process, which
               # the CLI run does not have: /brain is fuzzed above, operation by operation.
               "--exclude-path-regex", "^/rollouts|/brain$"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_PROXY": "*",
                                 "SCHEMATHESIS_HOOKS": fuzz_hooks.__file__})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    text = httpx.get(live.url + "/metrics", trust_env=False).text
    reached = [line for line in text.splitlines() if line.startswith("orch_requests_total")
               and 'status="200"' in line and "{user_id}" in line]
    assert any("/stop" in r or "/start" in r or "/rotate-key" in r for r in reached), reached


def test_the_fuzzing_reached_the_lifecycle_and_the_checks(live: Orchestrator) -> None:
    """Runs after the fuzzing (file order): it provisioned engines and was refused too."""
    operations = {result.ok().label for result in schema.get_all_operations()}
    if operations != FUZZED:  # split across xdist workers: this `live` saw only a part
        pytest.skip(f"only {len(FUZZED)} of {len(operations)} operations were fuzzed in this worker")
    events = {kind for (kind,) in live.rows("SELECT DISTINCT event FROM event")}
    assert "provision" in events, events
    text = httpx.get(live.url + "/metrics", trust_env=False).text
    assert 'route="/engines/provision",status="200"' in text
    assert 'route="/engines/{user_id}/admit",status="400"' in text  # negative cases too
