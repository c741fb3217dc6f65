"""The table of error codes and what is derived from it: the API's answer for each error, the
driver's edge, and the client's classes."""

from __future__ import annotations

import asyncio
import errno
import re
from pathlib import Path

import httpx
import pytest

from app import errors
from app.api.errors import classify
from app.client import _errors as client_errors
from app.drivers.base import Driver, EngineSpec, State
from app.drivers.instrumented import Instrumented


@pytest.mark.parametrize("error,status,code", [
    (errors.IllegalTransition("start", "destroying"), 409, "ILLEGAL_TRANSITION"),
    (errors.KeyNotConfirmed("the engine did not confirm the new key"), 502, "KEY_NOT_CONFIRMED"),
    (errors.DriverFailed("the local driver's stop failed (KeyError)"), 502, "DRIVER_FAILED"),
    (errors.EngineCrashed("exited while booting"), 504, "BOOT_TIMEOUT"),
    (errors.busy("u"), 503, "SCHEDULER_UNAVAILABLE"),
])
def test_each_error_is_answered_with_its_own_code(error: errors.DomainError, status: int,
                                                  code: str) -> None:
    assert classify(error, "rid")[:2] == (status, code)


def test_every_status_comes_from_the_table() -> None:
    for entry in errors.CODES:
        error = errors.DomainError("x")
        error.code = entry.code  # type: ignore[misc]
        assert classify(error, "rid")[0] == entry.status
        assert error.status == entry.status and error.retryable == entry.retryable


class _Broken(Driver):
    """A driver whose calls fail the way an OS or a bug fails, not with a domain error."""

    name = "broken"

    async def create(self, spec: EngineSpec, api_key: str) -> State:
        raise OSError(errno.ENOSPC, "No space left on device", "/secret/path")

    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        return {"pid": state["pid"]}

    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        raise errors.BootTimeout("not healthy", state)

    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        return state

    async def pause(self, spec: EngineSpec, state: State) -> None:
        return None

    async def resume(self, spec: EngineSpec, state: State) -> bool:
        return True

    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        return None

    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        return None

    async def probe(self, spec: EngineSpec, state: State) -> str:  # type: ignore[override]
        return "healthy"

    async def list_names(self) -> set[str]:
        return set()

    def watch(self, spec: EngineSpec, state: State) -> None:
        raise ValueError("bad pid")


def test_the_driver_edge_wraps_what_is_not_a_domain_error() -> None:
    driver, spec = Instrumented(_Broken()), EngineSpec("n", "p", "u", "v1")

    async def scenario() -> None:
        with pytest.raises(errors.DriverFailed) as os_error:
            await driver.create(spec, "key")
        assert "OSError: No space left on device" in os_error.value.message
        assert "/secret/path" not in os_error.value.message  # details go to the log only
        assert isinstance(os_error.value.__cause__, OSError)
        with pytest.raises(errors.DriverFailed, match="launch failed \\(KeyError\\)"):
            await driver.launch(spec, {}, "key")
        with pytest.raises(errors.BootTimeout):  # a domain error passes unchanged
            await driver.wait_ready(spec, {}, 1.0)
        with pytest.raises(errors.DriverFailed, match="watch failed"):
            driver.watch(spec, {})

    asyncio.run(scenario())


def test_the_client_knows_every_code_and_whether_to_retry() -> None:
    for entry in errors.CODES:
        response = httpx.Response(entry.status, json={"error": {
            "code": entry.code, "message": "m", "request_id": "r"}})
        error = client_errors.error_from_response(response)
        assert type(error).__name__ == entry.class_name
        assert error.retryable is entry.retryable


def test_the_contract_lists_every_code_with_its_status() -> None:
    contract = (Path(__file__).resolve().parents[2] / "app" / "CONTRACT.md").read_text()
    section = contract[contract.index("## Errors"):contract.index("## Policy")]
    rows = [line for line in section.splitlines() if line.startswith("| 4") or line.startswith("| 5")]
    for entry in errors.CODES:
        row = next((r for r in rows if re.search(rf"\b{entry.code}\b", r)), None)
        assert row is not None, entry.code
        assert row.startswith(f"| {entry.status} |"), (entry.code, row)
        assert f"| {'yes' if entry.retryable else 'no'} |" in row, (entry.code, row)
