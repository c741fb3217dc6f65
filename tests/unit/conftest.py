"""Fixtures of the unit tests that work on the registry itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import registry


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    """The registry on SQLite, or on a fresh PostgreSQL database with ORCH_TEST_DB=postgres."""
    from tests.harness import _drop_postgres_database, _fresh_postgres_database

    postgres = os.environ.get("ORCH_TEST_DB") == "postgres"
    url = _fresh_postgres_database() if postgres else f"sqlite:///{tmp_path / 'orch.db'}"
    database = registry.connect(url)
    yield database
    database.close()
    if postgres:
        _drop_postgres_database(url)
