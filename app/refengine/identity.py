"""Whose engine this is, kept in the brain: a warm pool's engine boots without a user and is
told it once claimed (PUT /v1/identity); a restart reads it back before anything is served."""

from __future__ import annotations

import os

FILE = "identity"


def load(brain_dir: str) -> str:
    try:
        with open(os.path.join(brain_dir, FILE), encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def save(brain_dir: str, user_id: str) -> None:
    # Written aside and renamed: a crash leaves the old file or the new, never half. No
    # fsync (milliseconds, on the claim's path): only a lost machine loses the page cache, and
    # every start the orchestrator makes after a claim names the user in ENGINE_USER_ID too.
    path = os.path.join(brain_dir, FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(user_id)
    os.replace(tmp, path)
