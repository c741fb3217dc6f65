from __future__ import annotations

import pytest

from app.config import ConfigError, Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.driver == "local" and s.boot_timeout_s == 60 and s.stop_grace_s == 30
    assert s.idle_sleep_s == 900 and s.sleep_mode == "pause" and s.max_restarts == 3
    assert s.port_range == (20000, 20999)


def test_one_state_dir_holds_the_database_by_default() -> None:
    # `make run`, `orch serve` and every CLI command read the same default.
    assert Settings.from_env({}).database_url == "sqlite:///.orch/orch.db"
    assert Settings.from_env({}).state_dir.as_posix() == ".orch"
    moved = Settings.from_env({"ORCH_STATE_DIR": "/srv/orch"})
    assert moved.database_url == "sqlite:////srv/orch/orch.db"
    assert str(moved.brain_root) == "/srv/orch/brains"
    named = Settings.from_env({"ORCH_STATE_DIR": "/srv/orch", "ORCH_DATABASE_URL": "sqlite:///x.db"})
    assert named.database_url == "sqlite:///x.db"


def test_engine_env_is_a_list_of_names() -> None:
    s = Settings.from_env({"ORCH_ENGINE_ENV": " TZ, HTTP_PROXY ,,"})
    assert s.engine_env == ("TZ", "HTTP_PROXY")
    assert Settings.from_env({}).engine_env == () and Settings.from_env({}).engine_user is None


def test_values_are_parsed() -> None:
    s = Settings.from_env({"ORCH_PORT_RANGE": "30000-30010", "ORCH_SLEEP_MODE": "STOP",
                           "ORCH_BOOT_TIMEOUT_S": "2.5", "ORCH_DRIVER": "nomad",
                           "CONSUL_HTTP_ADDR": "127.0.0.1:8500", "ORCH_STATE_DIR": "/tmp/x"})
    assert s.port_range == (30000, 30010) and s.sleep_mode == "stop"
    assert s.boot_timeout_s == 2.5 and s.driver == "nomad"
    assert s.consul_addr == "http://127.0.0.1:8500"
    assert str(s.brain_root) == "/tmp/x/brains"


@pytest.mark.parametrize("name,value", [
    ("ORCH_BOOT_TIMEOUT_S", "soon"), ("ORCH_BOOT_TIMEOUT_S", "0"), ("ORCH_BOOT_TIMEOUT_S", "nan"),
    ("ORCH_STOP_GRACE_S", "-1"), ("ORCH_MAX_RESTARTS", "2.5"), ("ORCH_PORT_RANGE", "20000"),
    ("ORCH_PORT_RANGE", "30000-20000"), ("ORCH_PORT_RANGE", "80-90"), ("ORCH_SLEEP_MODE", "nap"),
    ("ORCH_DRIVER", "k8s"), ("ORCH_DATABASE_URL", "mysql://x"), ("ORCH_PORT", "70000"),
    ("NOMAD_ADDR", "localhost:4646"), ("ORCH_LOG_LEVEL", "LOUD"),
    ("ORCH_ENGINE_ENV", "TZ,ORCH_SECRET_KEY"), ("ORCH_ENGINE_ENV", "NOMAD_TOKEN"),
    ("ORCH_ENGINE_ENV", "A B"), ("ORCH_ENGINE_ENV", "ENGINE_PORT"), ("ORCH_ENGINE_USER", " "),
    ("ORCH_ENGINE_GID_BASE", "10"), ("ORCH_ENGINE_GID_BASE", "4294967295"),
])
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=") and "\n" not in message
