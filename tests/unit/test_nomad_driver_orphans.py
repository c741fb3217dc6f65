"""Issue 8, row 6, the driver's side: Nomad's job stubs carry `Meta` only with `?meta=true`
(command/agent/job_endpoint.go), so a driver that lists jobs without it never recognises its
own. The other tests did not notice: an engine's volume and variable carry its name too. Here
a job is all that is left (its volume and variable already deleted, as a crash mid-destroy
leaves it), and the orphan sweep must still find it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from app import jobspec
from app.config import Settings
from app.drivers.base import EngineSpec
from app.drivers.nomad import NomadDriver
from tests.doubles.fixture import Hashistack, served
from tests.harness import ROOT, free_port_range

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    with served(tmp_path_factory.mktemp("orphans"), free_port_range(10), nodes=1) as hs:
        yield hs


def test_a_job_left_alone_is_listed_as_ours_and_a_foreign_one_is_not(stack: Hashistack) -> None:
    settings = Settings(driver="nomad", nomad_addr=stack.nomad, consul_addr=stack.consul,
                        nomad_jobspec=ROOT / "jobspecs" / "engine.docker.json")
    ours = EngineSpec("e-acme-lone-0123456789ab", "acme", "lone", "0.1.0")
    foreign = EngineSpec("e-other-job-0123456789ab", "acme", "x", "0.1.0")

    async def work() -> set[str]:
        driver = NomadDriver(settings)
        try:
            # a job with no volume and no variable: it waits, blocked, and is still ours
            await driver._io(driver.api.register, jobspec.render_job(settings, ours))
            stranger = jobspec.render_job(settings, foreign)
            stranger["Meta"] = {**stranger["Meta"], "managed_by": "someone-else"}
            await driver._io(driver.api.register, stranger)
            assert not [v for v in await driver._io(driver.api.volumes)
                        if v["Name"] in (ours.name, foreign.name)]
            return await driver.list_names()
        finally:
            for spec in (ours, foreign):
                await driver._io(driver.api.deregister, spec.name, True)
            await driver.close()

    names = asyncio.run(work())
    assert ours.name in names and foreign.name not in names
    assert httpx.get(f"{stack.nomad}/v1/jobs", params={"prefix": "e-"},
                     trust_env=False).json() == []
