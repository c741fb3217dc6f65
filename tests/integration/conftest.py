from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Orchestrator, running
from tests.s3server import s3_server


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[Orchestrator]:
    yield from _orchestrator(tmp_path, "local")


@pytest.fixture(params=["local", "nomad"])
def any_orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    """The same test on both drivers: local processes, and Nomad (the double, or real agents)."""
    yield from _orchestrator(tmp_path, request.param)


@pytest.fixture
def nomad_orch(tmp_path: Path) -> Iterator[Orchestrator]:
    yield from _orchestrator(tmp_path, "nomad")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3 server (tests/s3server.py), one per test process: each test its own prefix."""
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


def _orchestrator(tmp_path: Path, driver: str) -> Iterator[Orchestrator]:
    with running(tmp_path, driver) as orchestrator:
        yield orchestrator
