"""Where snapshots are kept: a directory or an S3-compatible bucket.

Each engine has a prefix of its own, `engines/<engine name>/`, holding
- `blobs/<sha256>`: a file's content, stored once however many snapshots name it;
- `manifests/<snapshot id>.json`: one snapshot, the list of its files and their blobs.

A manifest is written last and whole (a rename on disk; a single PUT on S3), so a snapshot that
is listed has every blob it names; a snapshot cut short leaves blobs that no manifest names,
which the next collection deletes. The engine's prefix is only written under the engine's
lease, so collecting its unreferenced blobs never races a snapshot of the same engine.
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app import errors


class Store(abc.ABC):
    """Objects under keys ("engines/<name>/blobs/<sha>"); every call is blocking (run it in a
    thread). Failures raise errors.SnapshotStoreFailed."""

    url: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write the object whole: readers see the old object, or none, or all of this one."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object, or None when there is none."""

    @abc.abstractmethod
    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, in no particular order."""

    @abc.abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Delete these objects; those already gone are no error."""

    def delete_prefix(self, prefix: str) -> None:
        self.delete(list(self.keys(prefix)))


class FileStore(Store):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        # Keys are made here from engine names ([a-z0-9-]), hex digests and snapshot ids.
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            self._dirs(path.parent)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as exc:
            raise _failed("write", key, exc) from exc

    def _dirs(self, path: Path) -> None:
        """Make `path` and its missing parents 0700: the brains of every user are in here."""
        if path.is_dir():
            return
        if path == self.root:  # the operator's directory: its parents are theirs
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            return
        self._dirs(path.parent)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _failed("read", key, exc) from exc

    def keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        # Temporary files are listed too: an engine's objects are written under its lease, so
        # one found by a collection was left by a writer that died, and is collected.
        for dirpath, _, names in os.walk(base):
            for name in names:
                yield str(Path(dirpath, name).relative_to(self.root))

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            _unlink(str(self._path(key)))

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


# The AWS settings a store may be given explicitly, and boto3.client's argument for each.
AWS_ARGUMENTS = {
    "AWS_ENDPOINT_URL": "endpoint_url", "AWS_REGION": "region_name",
    "AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token"}


class S3Store(Store):
    """Any S3-compatible store, through boto3. Endpoint, region and credentials are `aws`'s
    (AWS_ARGUMENTS) where given, else found the AWS way (AWS_* variables, profiles...)."""

    def __init__(self, bucket: str, prefix: str, aws: Mapping[str, str] | None = None):
        import boto3  # the server's only S3 dependency, imported only when a bucket is used
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                        read_timeout=30)
        # Passed to the client, never put in os.environ: the process may serve other stores.
        explicit: dict[str, Any] = {AWS_ARGUMENTS[k]: v for k, v in (aws or {}).items() if v}
        self.client: Any = boto3.client("s3", config=config, **explicit)

    def put(self, key: str, data: bytes) -> None:
        with self._call("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes | None:
        with self._call("read", key):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except self.client.exceptions.NoSuchKey:
                return None
            body: bytes = answer["Body"].read()
            return body

    def keys(self, prefix: str) -> Iterator[str]:
        with self._call("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            found = [o["Key"][len(self.prefix):] for page in pages for o in page.get("Contents", [])]
        yield from found

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[start:start + 1000]]
            with self._call("delete", batch[0]["Key"]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _call(self, what: str, key: str) -> Any:
        return _S3Errors(what, key)


class _S3Errors:
    """botocore's errors (network, credentials, throttling) as SnapshotStoreFailed."""

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, (BotoCoreError, ClientError)):
            raise _failed(self.what, self.key, exc) from exc


def open_store(url: str, aws: Mapping[str, str] | None = None) -> Store:
    """The store ORCH_SNAPSHOT_STORE names: file:///path or s3://bucket/prefix; `aws`, keyed
    by the names of AWS_ARGUMENTS, settles an S3 store's endpoint, region and credentials."""
    unknown = sorted(set(aws or {}) - set(AWS_ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown AWS settings {unknown}: known are {sorted(AWS_ARGUMENTS)}")
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FileStore(Path(parts.path))
    if parts.scheme == "s3":
        return S3Store(parts.netloc, parts.path, aws)
    raise ValueError(f"{url!r}: a snapshot store is file:///path or s3://bucket/prefix")


def _failed(what: str, key: str, exc: BaseException) -> errors.SnapshotStoreFailed:
    return errors.SnapshotStoreFailed(f"the snapshot store could not {what} {key}: {exc}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
