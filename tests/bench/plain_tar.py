"""The baseline beside the snapshot figures: a plain `tar` of the same brain, and its untar into
an empty directory, timed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def tar(brain: Path, tmp: Path) -> dict[str, Any]:
    """`tar -cf tmp/plain.tar` of the brain: seconds and bytes."""
    out = tmp / "plain.tar"
    started = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(brain), "."], check=True)
    return {"s": round(time.perf_counter() - started, 3), "bytes": out.stat().st_size}


def untar(tmp: Path) -> float:
    """Seconds to extract tmp/plain.tar into an empty directory (removed after)."""
    target = Path(tempfile.mkdtemp(dir=tmp))
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", str(tmp / "plain.tar"), "-C", str(target)], check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return round(elapsed, 3)
