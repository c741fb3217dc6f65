from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import Orchestrator


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[Orchestrator]:
    orchestrator = Orchestrator(tmp_path).start()
    orchestrator.product("acme")
    try:
        yield orchestrator
    finally:
        orchestrator.close()
