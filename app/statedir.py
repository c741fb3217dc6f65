"""The state directory: one place (ORCH_STATE_DIR, default `.orch`) for the database, the
secret key and the local driver's run files and brains, private to the orchestrator's user.

`private()` is called first thing by every `orch` command: from then on every file we create is
0600 and every directory 0700 (umask 077), whatever the umask we were started with; SQLite
gives its -wal and -shm files the database file's mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from app.config import Settings


class NoDatabase(Exception):
    """A read-only command found no database where the settings say it is."""


def private() -> None:
    os.umask(0o077)


def sqlite_path(settings: Settings) -> Path | None:
    url = settings.database_url
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def prepare(settings: Settings, create: bool) -> None:
    """Make (or tighten) the state dir and the SQLite files before the database is opened.

    With create=False the database must exist: a command that only reads or changes what is
    there never makes an empty database somewhere the server does not look.
    """
    db = sqlite_path(settings)
    if not create and db is not None and not db.exists():
        raise NoDatabase(
            f"no database at {db.resolve()} (ORCH_STATE_DIR={settings.state_dir}); "
            "run `orch serve` or `make run` first, or run from the directory that holds it")
    if create:
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.state_dir.exists():
        _tighten(settings.state_dir, dir_=True)
        for path in settings.state_dir.iterdir():  # secret.key, demo keys, a database here
            if stat.S_ISREG(path.lstat().st_mode):
                _tighten(path, dir_=False)
    if db is not None:  # a database elsewhere
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                _tighten(path, dir_=False)


def _tighten(path: Path, dir_: bool) -> None:
    # Older versions left 0644 files and 0755 directories. Read and write bits for others go;
    # a directory's search bit stays, since the local driver opens the state dir to engines'
    # user for passing through (0711) when it runs them as another user.
    mode = stat.S_IMODE(path.stat().st_mode)
    tight = mode & (0o711 if dir_ else 0o600)
    if tight != mode:
        os.chmod(path, tight)
