"""Admit's server CPU and throughput of this tree against another checkout of the project (an
older commit, say) and the bare Starlette endpoint, all three running at once and measured in
alternating 1 s rounds, so that load from elsewhere on a shared machine falls on all of them.

    git worktree add /tmp/before <commit>      # or: git archive <commit> | tar -x -C /tmp/before
    python -m tests.bench.versus /tmp/before [rounds]

The other tree's server runs with its own code (its `python -m app.cli serve`, cwd there) and
this tree's interpreter and packages.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import harness
from tests.bench.__main__ import CONNECTIONS, _admit_target, _listening, _orch, _timed_round
from tests.bench.loadgen import Target, run_in_process
from tests.harness import free_port, wait_for


def main() -> None:
    other = Path(sys.argv[1]).resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    here = harness.ROOT
    harness.ROOT = other  # Orchestrator.start runs `python -m app.cli serve` in ROOT
    try:
        before = _orch(Path(tempfile.mkdtemp(prefix="orch-versus-")))
    finally:
        harness.ROOT = here
    now = _orch(Path(tempfile.mkdtemp(prefix="orch-versus-")))
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "tests.bench.bare", str(port)], cwd=here,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), timeout=15, what="bare baseline")
        targets: dict[str, tuple[int, Target]] = {}
        for name, orch in (("other", before), ("this", now)):
            answer = orch.client("bench").post("/engines/provision", json={"user_id": "hot"})
            assert answer.status_code == 200, answer.text
            assert orch.proc is not None
            targets[name] = (orch.proc.pid, _admit_target(orch, "hot"))
        targets["bare"] = (bare.pid, Target("127.0.0.1", port, "POST", "/engines/hot/admit", {},
                                            b"{}"))
        for _, target in targets.values():
            run_in_process("saturate", target, connections=CONNECTIONS, seconds=1.0)
        results: dict[str, list[dict]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (pid, target) in targets.items():
                results[name].append(_timed_round(pid, target, 1.0))
        report(results)
    finally:
        bare.kill()
        bare.wait()
        before.close()
        now.close()


def report(results: dict[str, list[dict]]) -> None:
    for name, rounds in results.items():
        print(f"{name:5s}  server CPU {statistics.median(r['cpu_us'] for r in rounds):6.1f} us/admit"
              f"   {statistics.median(r['rps'] for r in rounds):8.0f} req/s")
    for name in ("other", "this"):
        pairs = list(zip(results[name], results["bare"]))
        cpu = statistics.median(b["cpu_us"] / o["cpu_us"] for o, b in pairs)
        rps = sorted(o["rps"] / b["rps"] for o, b in pairs)
        print(f"{name:5s}  vs bare: CPU ratio {cpu:.2f}   throughput ratio {statistics.median(rps):.2f}"
              f" (rounds {rps[0]:.2f}-{rps[-1]:.2f})")


if __name__ == "__main__":
    main()
