"""Where the Nomad-driver tests find Nomad and Consul, and how they look inside them.

By default: the double in tests/doubles (one process, real HTTP on loopback). With NOMAD_REAL=1:
real `nomad agent -dev` and `consul agent -dev` at NOMAD_ADDR and CONSUL_HTTP_ADDR (`make
nomad-dev` starts them); the tests skip, saying why, when the binaries or the agents are not
there. Everything here reads Nomad's and Consul's own HTTP APIs, so it works against both.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_VAR_PREFIX = "nomad/jobs/e-"
NODES = 3


def real() -> bool:
    return os.environ.get("NOMAD_REAL") == "1"


def scheduler_env(tmp: Path, port_range: tuple[int, int]) -> tuple[Any, dict[str, str]]:
    """(the double to close, or None for real agents; the orchestrator's environment)."""
    if real():
        return None, _real_agents_env()
    from tests.doubles.fixture import Hashistack

    # three nodes, so volume placement, spreading and node loss are real; a -dev agent's
    # timing unless a test asks for a production client's (5-10 s per new volume)
    dev = os.environ.get("ORCH_TEST_DOUBLE_TIMING", "dev") == "dev"
    stack = Hashistack(tmp, port_range, nodes=NODES, dev=dev).start()  # in tmp/hashistack
    return stack, {"ORCH_DRIVER": "nomad", "NOMAD_ADDR": stack.nomad, "CONSUL_HTTP_ADDR": stack.consul,
                   "ORCH_NOMAD_JOBSPEC": str(ROOT / "jobspecs" / "engine.docker.json")}


def _real_agents_env() -> dict[str, str]:
    missing = [b for b in ("nomad", "consul") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"NOMAD_REAL=1 but {' and '.join(missing)} not on PATH (see nomad/README.md)")
    nomad = os.environ.get("NOMAD_ADDR", "http://127.0.0.1:4646")
    consul = os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
    for name, url in (("nomad", nomad + "/v1/status/leader"), ("consul", consul + "/v1/status/leader")):
        try:
            httpx.get(url, timeout=2, trust_env=False).raise_for_status()
        except httpx.HTTPError:
            pytest.skip(f"NOMAD_REAL=1 but no {name} agent answers at {url} (run `make nomad-dev`)")
    # Without Docker on the node, the raw_exec template runs the reference engine directly.
    spec = "engine.docker.json" if shutil.which("docker") else "engine.raw_exec.json"
    return {"ORCH_DRIVER": "nomad", "NOMAD_ADDR": nomad, "CONSUL_HTTP_ADDR": consul,
            "ORCH_NOMAD_JOBSPEC": os.environ.get("ORCH_TEST_JOBSPEC", str(ROOT / "jobspecs" / spec))}


def needs_double(orch: Any) -> Any:
    """The double, for a test that injects faults; skips on real agents."""
    if orch.stack is None:
        pytest.skip("fault injection needs the Nomad+Consul double (not NOMAD_REAL=1)")
    return orch.stack


def get(base: str, path: str, **params: Any) -> Any:
    response = httpx.get(base + path, params=params, timeout=10, trust_env=False)
    response.raise_for_status()
    return response.json()


def leftovers(nomad: str) -> dict[str, list[str]]:
    """Every job, host volume and variable of ours that Nomad still holds."""
    return {
        "jobs": [j["ID"] for j in get(nomad, "/v1/jobs", prefix="e-", meta="true")
                 if (j.get("Meta") or {}).get("managed_by") == "orch"],
        "volumes": [v["Name"] for v in get(nomad, "/v1/volumes", type="host") or []
                    if v["Name"].startswith("e-")],
        "variables": [v["Path"] for v in get(nomad, "/v1/vars", prefix=OUR_VAR_PREFIX)],
    }


def nothing_left(nomad: str) -> bool:
    return not any(leftovers(nomad).values())


def task_log(nomad: str, job_id: str, task: str = "engine") -> str:
    """stdout and stderr of every allocation the job had, oldest first."""
    text = []
    for alloc in sorted(get(nomad, f"/v1/job/{job_id}/allocations"), key=lambda a: a["CreateIndex"]):
        for kind in ("stdout", "stderr"):
            response = httpx.get(f"{nomad}/v1/client/fs/logs/{alloc['ID']}", timeout=10, trust_env=False,
                                 params={"task": task, "type": kind, "plain": "true", "origin": "start"})
            if response.status_code == 200:
                text.append(response.text)
    return "".join(text)


def service(consul: str, name: str) -> list[dict[str, Any]]:
    return get(consul, f"/v1/health/service/{name}")


def scrub(nomad: str) -> None:
    """After a test on real agents: purge every job, volume and variable of ours it left."""
    with httpx.Client(base_url=nomad, timeout=30, trust_env=False) as http:
        for job in get(nomad, "/v1/jobs", prefix="e-", meta="true"):
            if (job.get("Meta") or {}).get("managed_by") == "orch":
                http.delete(f"/v1/job/{job['ID']}", params={"purge": "true"})
        for volume in get(nomad, "/v1/volumes", type="host") or []:
            if volume["Name"].startswith("e-"):
                for _ in range(50):  # the claim is released a moment after the allocation ends
                    answer = http.delete(f"/v1/volume/host/{volume['ID']}")
                    if answer.status_code < 400 or answer.text.startswith("no such volume"):
                        break
                    time.sleep(0.2)
        for var in get(nomad, "/v1/vars", prefix=OUR_VAR_PREFIX):
            http.delete(f"/v1/var/{var['Path']}")
