"""Who a local engine runs as, and who owns its files: engines are tenants too.

Run as root, the orchestrator starts engines as ORCH_ENGINE_USER (default `nobody`). One user
for every engine cannot keep engines apart by itself: a process may read the files and the
/proc entries (environ, cwd, fds, memory) of any process with the same uid *and gid*. So each
engine also gets a group of its own, ORCH_ENGINE_GID_BASE + its port (ports are unique per
engine, a primary key in the registry), and no supplementary groups. Its brain directory and
key file belong to root and that group, so the engine reaches them through the group and no
other engine reaches them at all; the kernel also refuses one engine another's /proc entries
(same uid, different gid). What a shared uid still allows: one engine can signal another.

The directories above an engine's own (the state dir, the brain root, the run root) are 0711
then: engines may pass through them but not list them, and what they hold is 0600/0700 ours.
Not root, or ORCH_ENGINE_USER naming ourselves: engines run as we do, everything is 0700/0600
ours, and nothing keeps an engine from our files (see README, "Security").
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ConfigError, Settings


@dataclass(frozen=True)
class Isolation:
    uid: int | None  # None: engines run as we do
    gid_base: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Isolation:
        return cls(_engine_uid(settings.engine_user), settings.engine_gid_base)

    @property
    def switching(self) -> bool:
        return self.uid is not None

    def gid(self, port: int) -> int | None:
        return self.gid_base + port if self.switching else None

    def prepare_root(self, path: Path) -> None:
        """A directory above engines' own: ours, 0711 when engines must pass through it."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o711 if self.switching else 0o700)

    def engine_dir(self, path: Path, port: int, mode: int, contents: bool = False) -> None:
        """An engine's own directory (brain 0o2770: setgid, so what the engine makes there
        keeps its group; run dir 0o750), owned by root and the engine's group. contents=True
        (the brain) also hands what is inside to the engine: a brain an engine running as
        root left, or one whose engine moved to another port (so another group)."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        gid = self.gid(port)
        if gid is None or self.uid is None:
            os.chmod(path, 0o700)
            return
        if path.stat().st_gid != gid:  # new, moved, or left by an older version
            if contents:
                _hand_over(path, self.uid, gid)
            os.chown(path, 0, gid)
        os.chmod(path, mode)

    def key_file_mode(self, fd: int, port: int) -> None:
        gid = self.gid(port)
        if gid is not None:
            os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o640)

    def popen_kwargs(self, port: int) -> dict[str, Any]:
        if self.uid is None:
            return {"umask": 0o077}
        return {"user": self.uid, "group": self.gid(port), "extra_groups": [], "umask": 0o077}


    def check_reachable(self, path: Path, fix: str) -> None:
        """Refuse to start when engines could not even reach their own directories, or the
        engine command: one line naming the directory in the way, instead of every provision
        failing later."""
        if not self.switching:
            return
        target = path.resolve()
        for step in [*reversed(target.parents), target]:
            info = step.stat()
            need = 0o001 if step.is_dir() else 0o004
            if not info.st_mode & need and info.st_uid != self.uid:
                raise ConfigError(f"engines run as uid {self.uid} cannot reach {target} "
                                  f"({step} is mode {info.st_mode & 0o777:o}): {fix}")

    def check_command(self, cmd: tuple[str, ...]) -> None:
        fix = ("set ORCH_ENGINE_CMD to one they can run (README, Security), "
               "or ORCH_ENGINE_USER to run engines as ourselves")
        exe = shutil.which(cmd[0])
        self.check_reachable(Path(exe or cmd[0]), fix)
        for arg in cmd[1:]:  # a script the interpreter must read
            if arg.startswith("/") and Path(arg).exists():
                self.check_reachable(Path(arg), fix)


def _engine_uid(name: str | None) -> int | None:
    """The uid to switch engines to, or None to run them as ourselves."""
    me = os.geteuid()
    if name is None:
        return _lookup("nobody") if me == 0 else None
    uid = _lookup(name)
    if uid == me:
        return None
    if me != 0:
        raise ConfigError(f"ORCH_ENGINE_USER={name!r} needs the orchestrator to run as root "
                          "(unset it to run engines as ourselves)")
    return uid


def _lookup(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid if not name.isdigit() else int(name)
    except KeyError:
        raise ConfigError(f"ORCH_ENGINE_USER={name!r} is invalid: no such user") from None


def _hand_over(root: Path, uid: int, gid: int) -> None:
    # lchown, and os.walk not following links: a link the engine planted never makes us
    # change a file outside its brain. A file with several names is skipped: it may be a
    # hard link to a file of ours (the kernel's protected_hardlinks usually refuses those).
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = os.path.join(dirpath, name)
            info = os.lstat(entry)
            if name in filenames and info.st_nlink > 1:
                continue
            os.lchown(entry, uid, gid)
