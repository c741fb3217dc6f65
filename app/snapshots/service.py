"""The snapshots of engines, as the operations see them: take, list, find, restore, prune,
delete. Blocking store calls run in a thread, so the event loop keeps answering admits."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from app import errors
from app.config import Settings
from app.snapshots import archive, tree
from app.snapshots.store import Store, open_store

ID_PATTERN = r"^s-[0-9]{17}-[0-9a-f]{8}$"
_ID = re.compile(ID_PATTERN)
FORMAT = 1

Manifest = dict[str, Any]


def new_id(now: float) -> str:
    """Sortable by time (to the millisecond), unique by its random tail."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}"
    return f"s-{stamp}-{secrets.token_hex(4)}"


def valid_id(snapshot_id: str) -> bool:
    return bool(_ID.fullmatch(snapshot_id))


def build_manifest(name: str, copied: Any, *, fingerprint: str, engine_version: str,
                   consistent: bool, now: float) -> Manifest:
    """A snapshot's manifest from what its copy reports (a tree.Taken, or the sidecar's
    answer as a mapping): the same whoever copied the files."""
    def field(key: str) -> Any:
        return copied[key] if isinstance(copied, dict) else getattr(copied, key)

    return {"format": FORMAT, "id": new_id(now), "engine": name, "created_at": now,
            "engine_version": engine_version, "consistent": consistent,
            "size_bytes": field("size_bytes"), "new_bytes": field("new_bytes"),
            "fingerprint": fingerprint, "dirs": field("dirs"), "files": field("files")}


def prefix(name: str) -> str:
    return f"engines/{name}/"


def manifest_key(name: str, snapshot_id: str) -> str:
    return f"{prefix(name)}manifests/{snapshot_id}.json"


class Snapshots:
    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self._store = store
        # engine name -> the fingerprint of its brain at its latest snapshot taken here
        self._seen: dict[str, str] = {}

    @property
    def store(self) -> Store:
        if self._store is None:  # an S3 client costs ~100 ms; only a snapshot call pays it
            self._store = open_store(self.settings.snapshot_store_url)
        return self._store

    async def take(self, name: str, brain: Path, *, engine_version: str, consistent: bool,
                   now: float | None = None) -> Manifest:
        """Copy the brain's files into the store; the manifest is listed by `commit`."""
        now = time.time() if now is None else now
        mark = tree.fingerprint(brain)
        taken = await asyncio.to_thread(tree.take, self.store, prefix(name), brain)
        return build_manifest(name, taken, fingerprint=mark, engine_version=engine_version,
                              consistent=consistent, now=now)

    async def import_archive(self, name: str, source: IO[bytes], *, engine_version: str,
                             now: float | None = None) -> Manifest:
        """A tar archive's files as a snapshot (listed by `commit`): a brain from elsewhere."""
        now = time.time() if now is None else now
        taken = await asyncio.to_thread(archive.import_tar, self.store, prefix(name), source)
        return build_manifest(name, taken, fingerprint="", engine_version=engine_version,
                              consistent=True, now=now)

    async def export(self, name: str, manifest: Manifest) -> AsyncIterator[bytes]:
        """The snapshot as a tar archive, a file at a time, read in a thread."""
        chunks = archive.export(self.store, prefix(name), manifest)
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk

    async def commit(self, name: str, manifest: Manifest) -> None:
        """List the snapshot: written last, once all its blobs are in the store."""
        data = json.dumps(manifest, separators=(",", ":")).encode()
        await asyncio.to_thread(self.store.put, manifest_key(name, manifest["id"]), data)
        self._seen[name] = manifest.get("fingerprint", "")

    async def changed(self, name: str, mark: str) -> bool:
        """Has the brain, whose fingerprint is now `mark`, changed since its latest snapshot?"""
        seen = self._seen.get(name)
        if seen is None:
            latest = await self.list(name, limit=1)
            seen = latest[0].get("fingerprint", "") if latest else ""
            self._seen[name] = seen
        return mark != seen

    async def ids(self, name: str) -> list[str]:
        """The engine's snapshot ids, newest first."""
        keys = await asyncio.to_thread(lambda: list(self.store.keys(f"{prefix(name)}manifests/")))
        ids = [k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys if k.endswith(".json")]
        return sorted((i for i in ids if valid_id(i)), reverse=True)

    async def list(self, name: str, after: str | None = None, limit: int = 100) -> list[Manifest]:
        ids = [i for i in await self.ids(name) if after is None or i < after][:limit]
        found = [await self.get(name, i) for i in ids]
        return [m for m in found if m is not None]

    async def get(self, name: str, snapshot_id: str) -> Manifest | None:
        if not valid_id(snapshot_id):
            return None
        raw = await asyncio.to_thread(self.store.get, manifest_key(name, snapshot_id))
        if raw is None:
            return None
        try:
            manifest: Manifest = json.loads(raw)
        except ValueError:
            raise errors.SnapshotStoreFailed(f"snapshot {snapshot_id} is damaged in the store") from None
        return manifest

    async def stage(self, name: str, manifest: Manifest, brain: Path) -> Path:
        """Write the snapshot beside the brain, every blob checked; the brain is untouched."""
        return await asyncio.to_thread(tree.stage, self.store, prefix(name), manifest, brain)

    async def prune(self, name: str) -> int:
        """Keep the newest ORCH_SNAPSHOT_KEEP snapshots; delete the others and every blob that
        no kept snapshot names (those of snapshots cut short too). Returns blobs deleted."""
        ids = await self.ids(name)
        keep, drop = ids[:self.settings.snapshot_keep], ids[self.settings.snapshot_keep:]
        if drop:
            await asyncio.to_thread(self.store.delete, [manifest_key(name, i) for i in drop])
        wanted: set[str] = set()
        for snapshot_id in keep:
            manifest = await self.get(name, snapshot_id)
            if manifest is None:
                return 0  # deleted meanwhile (a destroy): nothing to keep or to collect here
            wanted.update(f[3] for f in manifest["files"])
        blobs = await asyncio.to_thread(lambda: list(self.store.keys(f"{prefix(name)}blobs/")))
        unused = [k for k in blobs if k.rsplit("/", 1)[-1] not in wanted]
        if unused:
            await asyncio.to_thread(self.store.delete, unused)
        return len(unused)

    async def delete_all(self, name: str) -> None:
        """Every snapshot of the engine, and its blobs: manifests first, so none is listed
        without its blobs."""
        self._seen.pop(name, None)

        def delete() -> None:
            manifests = list(self.store.keys(f"{prefix(name)}manifests/"))
            self.store.delete(manifests)
            self.store.delete_prefix(prefix(name))

        await asyncio.to_thread(delete)

    def forget(self, name: str) -> None:
        """The brain was replaced: compare it with the store next time, not with memory."""
        self._seen.pop(name, None)
