"""The reference engine's configuration, read once from its environment (see app.refengine).

Imports stay minimal (no dataclasses, typing or pathlib): every millisecond here is boot time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

REQUIRED = ("ENGINE_PORT", "ENGINE_BRAIN_DIR", "ENGINE_API_KEY_FILE")


class ConfigError(Exception):
    """A missing or bad setting; its message is the one line printed before exiting 2."""


def say(line: str) -> None:
    """One line on stdout, unbuffered and in one write: tests read the log while we run (and
    after a SIGKILL), and a single write keeps lines from different threads whole."""
    data = (line + "\n").encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError:
        pass  # no stdout (closed, or a reader gone) must not take the engine down


def complain(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Faults:
    """The test knobs carried in ENGINE_VERSION (documented in app.refengine)."""

    __slots__ = (
        "boot_delay_ms",
        "crash",
        "crash_after_ms",
        "hang_term",
        "hup_delay_ms",
        "identity_delay_ms",
        "identity_drop_unheard",
        "never_healthy",
    )

    def __init__(self, version: str = ""):
        # Knobs live after the first `+`, like semver build metadata, so the base version
        # (whatever its spelling) can never switch one on.
        tokens = set(version.split("+")[1:])
        self.crash = "fault-crash" in tokens
        self.never_healthy = "fault-never-healthy" in tokens
        self.hang_term = "fault-hang-term" in tokens
        self.boot_delay_ms = _millis(tokens, "boot-delay-") or 0
        self.crash_after_ms = _millis(tokens, "fault-crash-after-")
        self.hup_delay_ms = _millis(tokens, "hup-delay-") or 0
        self.identity_delay_ms = _millis(tokens, "identity-delay-") or 0
        self.identity_drop_unheard = "identity-drop-unheard" in tokens


def _millis(tokens: set[str], prefix: str) -> int | None:
    for token in tokens:
        digits = token[len(prefix):]
        if token.startswith(prefix) and digits.isascii() and digits.isdigit():
            return int(digits)
    return None  # absent or malformed: unknown tokens are ignored, so malformed ones are too


class Config:
    __slots__ = ("brain_dir", "faults", "host", "key_file", "port", "user_id", "version")

    def __init__(self, port: int, host: str, brain_dir: str, key_file: str, user_id: str,
                 version: str):
        self.port = port
        self.host = host
        self.brain_dir = brain_dir
        self.key_file = key_file
        self.user_id = user_id
        self.version = version
        self.faults = Faults(version)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        missing = [name for name in REQUIRED if not env.get(name, "").strip()]
        if missing:
            raise ConfigError(f"refengine: missing required environment variable(s): "
                              f"{', '.join(missing)}")
        raw_port = env["ENGINE_PORT"].strip()
        if not (raw_port.isascii() and raw_port.isdigit() and int(raw_port) <= 65535):
            raise ConfigError(f"refengine: ENGINE_PORT must be a port number 0-65535, "
                              f"not {raw_port!r}")
        return cls(port=int(raw_port),
                   host=env.get("ENGINE_HOST", "").strip() or "127.0.0.1",
                   brain_dir=os.path.abspath(env["ENGINE_BRAIN_DIR"]),
                   key_file=os.path.abspath(env["ENGINE_API_KEY_FILE"]),
                   user_id=env.get("ENGINE_USER_ID", ""),
                   version=env.get("ENGINE_VERSION", ""))
