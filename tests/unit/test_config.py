from __future__ import annotations

import pytest

from app.config import ConfigError, Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.driver == "local" and s.boot_timeout_s == 60 and s.stop_grace_s == 30
    assert s.idle_sleep_s == 900 and s.sleep_mode == "pause" and s.max_restarts == 3
    assert s.port_range == (20000, 20999) and s.database_url == "sqlite:///orch.db"


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
])
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=") and "\n" not in message
