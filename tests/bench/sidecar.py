"""The snapshot sidecar's figures on S3 (SeaweedFS's `weed mini` on loopback): the serve
process's resident memory (VmRSS) at rest, after one snapshot and after ten, beside a bare
`python -c 'sleep'`; and a snapshot's wall time through the sidecar (a child process per
snapshot: interpreter start, boto3 import, client) beside the same snapshot taken in this
process with a kept client, same brain, same run. BENCH_SIDECAR_OTHER=<a checkout's root> runs
that checkout's sidecar the same way, beside this one.

Run alone: `.venv/bin/python -m tests.bench.sidecar` (about half a minute).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.snapshots import tree
from app.snapshots.store import open_store
from tests.harness import ROOT, free_port, wait_for
from tests.s3server import BUCKET, s3_server

FILES, FILE_KB, SNAPSHOTS = 200, 64, 10


def bench_sidecar(tmp: Path) -> dict[str, Any]:
    brain = tmp / "brain"
    brain.mkdir(parents=True)
    for n in range(FILES):
        (brain / f"f{n:04d}").write_bytes(os.urandom(FILE_KB * 1024))
    roots = {"this": ROOT, **({"other": Path(os.environ["BENCH_SIDECAR_OTHER"])}
                              if os.environ.get("BENCH_SIDECAR_OTHER") else {})}
    (tmp / "weed").mkdir()
    with s3_server(tmp / "weed") as s3:
        results = {name: _served(tmp, root, brain, s3, f"engines/{name}/") for name, root in roots.items()}
        results["in-process"] = _in_process(brain, s3, "engines/in-process/")
    results["bare python"] = {"rest_kib": _bare_rss()}
    return results


def _served(tmp: Path, root: Path, brain: Path, s3: dict[str, str], prefix: str) -> dict[str, Any]:
    config, port = tmp / f"{prefix.split('/')[1]}.json", free_port()
    config.write_text(json.dumps({"store": f"s3://{BUCKET}/bench", "aws": s3, "prefix": prefix,
                                  "token": "t"}))
    env = {"PATH": os.environ["PATH"], "ORCH_SIDECAR_BRAIN": str(brain), "ORCH_SIDECAR_CONFIG": str(config),
           "ORCH_SIDECAR_HOST": "127.0.0.1", "ORCH_SIDECAR_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "app.snapshots.sidecar"], cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}, timeout=120,
                          trust_env=False) as client:
            wait_for(lambda: _up(client), timeout=30, what="the sidecar")
            rest = _rss(proc.pid)
            times, after_one = [], 0
            for _ in range(SNAPSHOTS):
                started = time.perf_counter()
                answer = client.post("/v1/snapshot")
                times.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
                after_one = after_one or _rss(proc.pid)
            return {"rest_kib": rest, "one_kib": after_one, "ten_kib": _rss(proc.pid), **_times(times)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _in_process(brain: Path, s3: dict[str, str], prefix: str) -> dict[str, Any]:
    store = open_store(f"s3://{BUCKET}/bench", s3)  # kept, as a resident sidecar would keep it
    times = []
    for _ in range(SNAPSHOTS):
        started = time.perf_counter()
        tree.fingerprint(brain)
        tree.take(store, prefix, brain)
        times.append(time.perf_counter() - started)
    return _times(times)


def _times(times: list[float]) -> dict[str, Any]:
    """The first (every byte new) and the median of the others (nothing new)."""
    return {"first_s": round(times[0], 3), "next_s": round(statistics.median(times[1:]), 3)}


def _up(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def _bare_rss() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1)
        return _rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def lines(r: dict[str, Any]) -> list[str]:
    out = [f"sidecar bare python: {r['bare python']['rest_kib'] / 1024:.1f} MiB at rest"]
    for name, f in r.items():
        if "one_kib" in f:
            out.append(f"sidecar {name}: VmRSS {f['rest_kib'] / 1024:.1f} MiB at rest, "
                       f"{f['one_kib'] / 1024:.1f} after one S3 snapshot, "
                       f"{f['ten_kib'] / 1024:.1f} after ten")
        if "first_s" in f:
            out.append(f"sidecar {name}: snapshot of {FILES} x {FILE_KB} KiB: first {f['first_s']} s, "
                       f"unchanged {f['next_s']} s (median of {SNAPSHOTS - 1})")
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="orch-bench-sidecar-") as tmp:
        print("\n".join(lines(bench_sidecar(Path(tmp)))))
