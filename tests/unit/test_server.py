"""uvicorn's settings for `orch serve` come from configuration (app/api/server.py)."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api import server
from app.config import Settings


def test_defaults_are_the_specs_limits() -> None:
    settings = Settings.from_env({})
    assert settings.head_timeout_s == 10 and settings.limit_concurrency == 1000
    assert settings.body_timeout_s == 10
    assert settings.metrics_token is None
    assert settings.keepalive_s == 30
    assert server.MAX_HEAD == 64 * 1024


def test_the_server_is_built_from_settings() -> None:
    settings = Settings.from_env({"ORCH_LIMIT_CONCURRENCY": "7", "ORCH_HEAD_TIMEOUT_S": "2.5",
                                  "ORCH_BODY_TIMEOUT_S": "3.5",
                                  "ORCH_HOST": "127.0.0.2", "ORCH_PORT": "9999", "ORCH_KEEPALIVE_S": "12"})
    config = server.config(object(), settings)
    assert (config.host, config.port, config.limit_concurrency) == ("127.0.0.2", 9999, 7)
    assert issubclass(config.http, server.GuardedHttpToolsProtocol)
    assert issubclass(config.http, HttpToolsProtocol)  # uvicorn's own, extended, not a fork
    assert config.http.head_timeout_s == 2.5 and config.http.body_timeout_s == 3.5
    assert config.timeout_keep_alive == 12
    assert (config.access_log, config.lifespan) == (False, "on")
    assert server.config(object(), settings, "0.0.0.0", 0).port == 0


def test_bad_values_stop_start_up_naming_the_variable() -> None:
    import pytest

    from app.config import ConfigError

    for name, raw in (("ORCH_LIMIT_CONCURRENCY", "0"), ("ORCH_LIMIT_CONCURRENCY", "many"),
                      ("ORCH_HEAD_TIMEOUT_S", "-1"), ("ORCH_BODY_TIMEOUT_S", "0"),
                      ("ORCH_METRICS_TOKEN", "  "),
                      ("ORCH_KEEPALIVE_S", "0"), ("ORCH_KEEPALIVE_S", "2.5")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: raw})


def test_the_quiet_server_refreshes_the_date_and_an_exit_signal_wakes_it() -> None:
    """QuietServer sleeps a second between its housekeeping steps, not 0.1 s; here an hour,
    so only the exit signal's wake-up can end the serve before the bounded wait does."""
    import asyncio
    import signal
    import socket

    async def app(scope: dict, receive: object, send: object) -> None:  # never called
        raise AssertionError(scope)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    quiet = server.QuietServer(server.config(app, Settings.from_env({}), "127.0.0.1", port,
                                             lifespan="off", log_level="warning"))
    quiet.TICK_S = 3600.0

    async def scenario() -> None:
        serving = asyncio.create_task(quiet.serve())
        while not quiet.started:
            await asyncio.sleep(0.01)
        assert any(name == b"date" for name, _ in quiet.server_state.default_headers)
        quiet.handle_exit(signal.SIGTERM, None)
        quiet._captured_signals.clear()  # uvicorn re-raises it at the end: not in pytest
        await asyncio.wait_for(serving, timeout=30)  # without the wake-up: an hour

    asyncio.run(scenario())
