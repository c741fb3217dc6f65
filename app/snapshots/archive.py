"""A snapshot as a tar archive, out and in: how a brain moves between products or clusters.

Out: the snapshot's files as a plain POSIX tar, streamed blob by blob, each checked against its
digest. In: a tar (or .tar.gz) of regular files and directories becomes a snapshot of the
engine, through the same blobs and manifest as any other, so it is listed only once whole; a
link, a device, a path leaving the brain, a name given twice or a damaged archive is refused
(400) and nothing is listed.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from app import errors
from app.snapshots import tree
from app.snapshots.store import Store

BLOCK = 512


def header(rel: str, size: int, mode: int, mtime: float, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(rel)
    info.size = 0 if directory else size
    info.mode = mode or (0o700 if directory else 0o600)
    info.mtime = int(mtime)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def export(store: Store, prefix: str, manifest: dict[str, Any]) -> Iterator[bytes]:
    """The snapshot's tar, a file at a time (each a blocking store read)."""
    created = manifest["created_at"]
    for rel in manifest.get("dirs", []):
        yield header(rel, 0, 0o700, created, directory=True)
    for rel, size, mode, digest in manifest["files"]:
        data = store.get(tree.blob_key(prefix, digest))
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise errors.SnapshotStoreFailed(f"the stored copy of {rel!r} is missing or damaged")
        yield header(rel, size, mode, created) + data + padding(size)
    yield end()


def import_tar(store: Store, prefix: str, archive: IO[bytes]) -> tree.Taken:
    """Store the archive's files as blobs; the manifest is the caller's to commit."""
    have = {key.rsplit("/", 1)[-1] for key in store.keys(f"{prefix}blobs/")}
    taken = tree.Taken()
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            for member in tar:
                _take_member(store, prefix, tar, member, taken, seen, have)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise errors.invalid(f"not a readable tar archive: {exc}") from None
    return taken


def _take_member(store: Store, prefix: str, tar: tarfile.TarFile, member: tarfile.TarInfo,
                 taken: tree.Taken, seen: set[str], have: set[str]) -> None:
    rel = tree.safe_path(member.name.removeprefix("./").rstrip("/"))
    if rel in seen:
        raise errors.invalid(f"the archive names {rel!r} twice")
    seen.add(rel)
    if member.isdir():
        taken.dirs.append(rel)
        return
    if not member.isreg():
        raise errors.invalid(f"{rel!r} is not a regular file or directory")
    source = tar.extractfile(member)
    assert source is not None  # a regular member always has its data
    data = source.read()
    if len(data) != member.size:
        raise errors.invalid(f"the archive ends inside {rel!r}")
    digest = hashlib.sha256(data).hexdigest()
    if digest not in have:
        store.put(tree.blob_key(prefix, digest), data)
        have.add(digest)
        taken.new_bytes += len(data)
    taken.files.append([rel, len(data), member.mode & 0o777, digest])
    taken.size_bytes += len(data)

