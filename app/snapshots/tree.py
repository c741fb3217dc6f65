"""A brain directory into the store and back.

Taking: every regular file is read whole and its SHA-256 taken over the bytes read, and those
bytes are the blob, so a file written during the copy is stored as one version of it, never
half of two; a file whose size or mtime moved while it was read is read again. A blob already
in the store is not sent again, so the next snapshot of a brain costs its changed files.

Restoring: the snapshot is written into a staging directory beside the brain, each blob checked
against its digest, and then swapped with the brain in one renameat2(RENAME_EXCHANGE), so a
process killed at any point leaves the old brain or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app import errors
from app.snapshots.store import Store

READ_TRIES = 3
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass
class Taken:
    files: list[list[Any]] = field(default_factory=list)  # [path, size, mode, sha256]
    dirs: list[str] = field(default_factory=list)
    size_bytes: int = 0
    new_bytes: int = 0  # sent to the store by this snapshot


def blob_key(prefix: str, digest: str) -> str:
    return f"{prefix}blobs/{digest}"


def take(store: Store, prefix: str, brain: Path) -> Taken:
    """Copy the files under `brain` into the store's blobs; the manifest is the caller's."""
    have = {key.rsplit("/", 1)[-1] for key in store.keys(f"{prefix}blobs/")}
    taken = Taken()
    for path, rel in _walk(brain, taken.dirs):
        data, mode = _read_settled(path)
        if data is None:
            continue  # deleted while we looked: not part of this snapshot
        digest = hashlib.sha256(data).hexdigest()
        if digest not in have:
            store.put(blob_key(prefix, digest), data)
            have.add(digest)
            taken.new_bytes += len(data)
        taken.files.append([rel, len(data), mode, digest])
        taken.size_bytes += len(data)
    return taken


def fingerprint(brain: Path) -> str:
    """What a brain looks like from its metadata (names, sizes, mtimes, modes): a cheap
    "changed since?" test that reads no file."""
    h = hashlib.sha256()
    for path, rel in _walk(brain, []):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    return h.hexdigest()


def stage(store: Store, prefix: str, manifest: dict[str, Any], brain: Path) -> Path:
    """Write the snapshot's files into a staging directory beside `brain`, every blob
    checked against its digest; `brain` itself is not touched."""
    staging = staging_dir(brain)
    shutil.rmtree(staging, ignore_errors=True)  # one a killed restore left
    staging.mkdir(mode=0o700, parents=True)
    try:
        fill(staging, manifest, lambda digest: read_blob(store, prefix, digest))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def staging_dir(brain: Path) -> Path:
    # A dot name: never taken for an engine's brain (engine names start with a letter).
    return brain.parent / f".restore-{brain.name}"


def replace(staging: Path, brain: Path) -> None:
    """Make `brain` the staged files, all at once, and drop the old ones."""
    swap_in(staging, brain)
    shutil.rmtree(staging, ignore_errors=True)  # the old brain, after the swap


def fill(target: Path, manifest: dict[str, Any], blob: Any) -> None:
    """Write the manifest's directories and files under `target`; `blob(digest)` gives bytes."""
    for rel in manifest.get("dirs", []):
        (target / safe_path(rel)).mkdir(parents=True, exist_ok=True)
    for rel, size, mode, digest in manifest["files"]:
        data = blob(digest)
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise errors.SnapshotStoreFailed(f"the stored copy of {rel!r} is damaged")
        path = target / safe_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode) or 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def empty(directory: Path) -> None:
    """Remove everything inside `directory`, keeping the directory itself (a mount point)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def swap_in(staging: Path, brain: Path) -> None:
    """Put `staging` where `brain` is; the old brain ends up at `staging`."""
    if not brain.exists():
        os.rename(staging, brain)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(brain),
                      _RENAME_EXCHANGE) == 0:
        return
    code = ctypes.get_errno()
    raise OSError(code, f"cannot swap {staging} and {brain}: {os.strerror(code)}")


def safe_path(rel: str) -> str:
    """A manifest's or archive's path, refused unless it stays inside the brain."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\0" in rel:
        raise errors.invalid(f"path {rel!r} leaves the brain directory")
    return rel


def read_blob(store: Store, prefix: str, digest: str) -> bytes:
    data = store.get(blob_key(prefix, digest))
    if data is None:
        raise errors.SnapshotStoreFailed(f"the snapshot's blob {digest} is missing from the store")
    return data


def _walk(brain: Path, dirs: list[str]) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    if not brain.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(brain):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            dirs.append(str((base / name).relative_to(brain)))
        for name in sorted(filenames):
            path = base / name
            if path.is_file() and not path.is_symlink():  # links and devices are not data
                found.append((path, str(path.relative_to(brain))))
    return found


def _read_settled(path: Path) -> tuple[bytes | None, int]:
    """The file's bytes, read while neither its size nor its mtime moved (within
    READ_TRIES reads; after that the last read, which is still one whole read)."""
    data, mode = b"", 0
    for _ in range(READ_TRIES):
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
                after = os.fstat(f.fileno())
        except FileNotFoundError:
            return None, 0
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None, 0
            raise
        mode = before.st_mode
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns) \
                and len(data) == after.st_size:
            break
    return data, stat.S_IMODE(mode)
