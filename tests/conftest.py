"""Shared test set-up: this process adopts orphaned engines so every child is reaped."""

from __future__ import annotations

import ctypes
import os

import pytest

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Engines outlive the orchestrator on purpose; when a test kills the orchestrator, its
    # engines are re-parented to us (not to init) so that we can kill and reap them.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
