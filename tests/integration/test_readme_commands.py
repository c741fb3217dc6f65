"""The README's commands as a new operator runs them from a fresh clone, where a test can:
without the Makefile's variables, with the defaults only, from a fresh state dir. The
quickstart and the how-tos run in the order written, and each output the README shows is
what the command prints at a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import pwd
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import reap_zombies
from tests.harness import ROOT, SYSTEM_PYTHON, free_port, free_port_range, passable_tmp, wait_for


def reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [*path.parents, path] if p.is_dir())


@pytest.fixture
def project() -> Iterator[Path]:
    """A directory to run `orch` from, that engines run as `nobody` can pass through."""
    with passable_tmp("orch-readme-") as base:
        if not reachable_by_others(ROOT / "app" / "refengine"):
            pytest.skip(f"{ROOT} is not reachable by other users: engines could not run from it")
        yield base


def operator_env(ports: int = 5) -> dict[str, str]:
    """An operator's shell: none of our variables (not even the Makefile's ORCH_ENGINE_CMD),
    only a port range of this test worker's own, so parallel tests never share a port."""
    low, high = free_port_range(ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "NOMAD_", "CONSUL_"))}
    return {**env, "ORCH_PORT_RANGE": f"{low}-{high}", "PYTHONPATH": str(ROOT), "NO_PROXY": "*"}


def orch(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def engine_pids(state: Path) -> list[int]:
    conn = sqlite3.connect(state / "orch.db", timeout=10)
    try:
        rows = conn.execute("SELECT driver_state FROM engine").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]).get("pid") for r in rows if json.loads(r[0]).get("pid")]


def test_as_root_serve_and_the_cli_run_engines_as_nobody_without_the_makefile(project: Path) -> None:
    """`make run` gives a root orchestrator an engine command `nobody` can run; `orch serve`,
    `orch engines upgrade` and `orch reconcile` run from the same directory without it
    would otherwise stop at once ("engines run as uid 65534 cannot reach /root/.pyenv/...")."""
    env = operator_env()
    ensured = orch(project, env, "products", "ensure", "demo")
    assert ensured.returncode == 0, ensured.stderr
    key = ensured.stdout.split("ORCH_PLATFORM_KEY=")[1].split()[0]
    port = free_port()
    log = project / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                  cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-Platform-Key": key},
                       trust_env=False, timeout=60)
    try:
        def up() -> bool:
            assert server.poll() is None, log.read_text()[-2000:]
            try:
                return api.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=30, what="orch serve")
        made = api.post("/engines/provision", json={"user_id": "alice"})
        assert made.status_code == 200, made.text
        (pid,) = engine_pids(project / ".orch")
        uid = os.stat(f"/proc/{pid}").st_uid
        assert uid == pwd.getpwnam("nobody").pw_uid
        bearer = {"Authorization": f"Bearer {made.json()['api_key']}"}
        put = httpx.put(f"{made.json()['url']}/v1/memory/colour", content=b"blue",
                        headers=bearer, trust_env=False)
        assert put.status_code < 300, put.text

        upgraded = orch(project, env, "engines", "upgrade", "demo", "alice", "ref-2")
        assert upgraded.returncode == 0, upgraded.stderr
        assert json.loads(upgraded.stdout)["engine_version"] == "ref-2"
        url = api.get("/engines/alice").json()["url"]
        kept = httpx.get(f"{url}/v1/memory/colour", headers=bearer, trust_env=False)
        assert kept.status_code == 200 and kept.content == b"blue"  # the brain came along

        passed = orch(project, env, "reconcile")
        assert passed.returncode == 0, passed.stderr
        assert api.delete("/engines/alice").status_code == 200
    finally:
        api.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for pid in engine_pids(project / ".orch"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap_zombies()  # engines orphaned by the server come back to this subreaper


def test_an_engine_command_or_user_given_is_kept(project: Path) -> None:
    """The default applies only when nothing is said: ORCH_ENGINE_CMD or ORCH_ENGINE_USER win."""
    from app.cli import _reachable_engine_cmd
    from app.config import Settings

    default = _reachable_engine_cmd(Settings())
    assert default.engine_cmd == (str(SYSTEM_PYTHON), str(ROOT / "app" / "refengine"))
    for given in (Settings(engine_cmd=("/bin/engine",)), Settings(engine_user="root"),
                  Settings(driver="nomad")):
        assert _reachable_engine_cmd(given) == given


# ---- the README's examples, run as written ------------------------------------------------

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MARK = "@@ {} @@"
README_PORTS = 20000  # the README shows engines on ORCH_PORT_RANGE's default


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)  # the `#  ` lines under it


def section(heading: str) -> str:
    """A heading's text, up to the next heading of its level or above (a `#` line in a code
    block is no heading)."""
    level, lines, fenced = 0, [], False
    for line in README.read_text().splitlines(keepends=True):
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#")) if not fenced and line.startswith("#") else 0
        if level and hashes and hashes <= level:
            break
        if level:
            lines.append(line)
        elif hashes and line[hashes:].strip() == heading:
            level = hashes
    assert level, f"README.md has no heading {heading!r}"
    return "".join(lines)


def blocks(heading: str, language: str = "sh") -> list[str]:
    return [body for lang, body in FENCE.findall(section(heading)) if lang == language]


def steps(block: str) -> list[Step]:
    parsed: list[Step] = []
    for line in block.splitlines():
        if line.startswith("#  "):
            assert parsed, f"output shown before any command: {line!r}"
            parsed[-1].expected.append(line[3:].rstrip())
        elif line.strip() and not line.startswith("#"):
            parsed.append(Step(line))
    return parsed


def shown(expected: list[str], actual: list[str]) -> bool:
    """Is `actual` what the README shows? `...` in a line stands for any text; a line that is
    only `...`, for any lines; a progress bar (`━━━`), for one as wide as the terminal made it."""
    pattern = "".join("(?:.*\n)*?" if line.strip() == "..." else
                      re.sub("━+", "━+", re.escape(line).replace(re.escape("..."), ".*")) + "\n"
                      for line in expected)
    return re.fullmatch(pattern, "".join(f"{line}\n" for line in actual)) is not None


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: enough of one for rich's live display (cursor
    up, erase line, carriage return) and our tables; colours and cursor hiding are dropped."""
    lines: list[str] = [""]
    row = col = 0
    for m in re.finditer(r"\x1b\[([?\d;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+", raw):
        token = m.group(0)
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        elif m.group(2) == "A":
            row = max(0, row - int(m.group(1) or 1))
        elif m.group(2) == "K":
            lines[row] = "" if m.group(1) == "2" else lines[row][:col]
        elif m.group(2):
            continue  # colours, cursor shown or hidden
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines]


def run_at_a_terminal(cwd: Path, env: dict[str, str], script: list[Step],
                      timeout: float = 120) -> list[tuple[int, list[str]]]:
    """Run the steps in one bash, its stdout a terminal (so `orch` prints tables, as the README
    shows them); each step's exit status and the lines it showed."""
    mark = MARK.format("%d")
    text = "".join(f"{s.command}\nprintf '\\n{mark}\\n' $?\n" for s in script)
    (cwd / "walkthrough.sh").write_text(text)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
    with open(cwd / "walkthrough.err", "wb") as err:
        shell = subprocess.Popen(["bash", "walkthrough.sh"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=secondary, stderr=err, start_new_session=True)
    os.close(secondary)
    raw, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the shell and everything it started are gone
                    break
                if not chunk:
                    break
                raw += chunk
        else:
            pytest.fail(f"the walkthrough did not end in {timeout} s: {raw.decode()[-2000:]}")
    finally:
        os.close(primary)
        shell.wait(timeout=10)
    results, lines = [], []
    for line in screen(raw.decode(errors="replace")):
        end = re.fullmatch(MARK.format(r"(\d+)"), line)
        if end:
            while lines and not lines[-1]:
                lines.pop()
            results.append((int(end.group(1)), lines))
            lines = []
        else:
            lines.append(line)
    return results


def as_shown(line: str, low: int, server: int) -> str:
    """URLs as the README shows them: the server on ORCH_PORT's default, engines in
    ORCH_PORT_RANGE's (the test's own ports put there)."""
    def port(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return f"127.0.0.1:{8080 if n == server else README_PORTS + n - low if low <= n < low + 100 else n}"
    return re.sub(r"127\.0\.0\.1:(\d+)", port, line)


def check(script: list[Step], results: list[tuple[int, list[str]]], env: dict[str, str],
          errors: Path) -> None:
    low, server = int(env["ORCH_PORT_RANGE"].split("-")[0]), int(env["ORCH_PORT"])
    assert len(results) == len(script), errors.read_text()[-2000:]
    for step, (status, shown_lines) in zip(script, results, strict=True):
        lines = [as_shown(line, low, server) for line in shown_lines]
        assert status == 0, f"{step.command}: exit status {status}\n{lines}\n{errors.read_text()[-2000:]}"
        if step.expected:
            assert shown(step.expected, lines), f"{step.command}: README shows\n" + \
                "\n".join(step.expected) + "\nit printed\n" + "\n".join(lines)


class MakeRun:
    """`make run` in `project`: the product "demo", then `orch serve` (the Makefile's recipe,
    without installing)."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project, self.env, self.port = project, env, int(env["ORCH_PORT"])
        ensured = orch(project, env, "products", "ensure", "demo")
        assert ensured.returncode == 0, ensured.stderr
        with open(project / "serve.log", "wb") as out:
            self.server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=project,
                                           env=env, stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.server.poll() is None, (project / "serve.log").read_text()[-2000:]
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/healthz", trust_env=False).is_success
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=60, what="orch serve")

    def pids(self) -> list[int]:
        db = self.project / ".orch"
        return engine_pids(db) if (db / "orch.db").exists() else []

    def close(self, pids: list[int]) -> None:
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=30)
        for pid in {*pids, *self.pids()}:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap_zombies()


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    """Where an operator runs the README: as root, a directory `nobody`'s engines can pass
    through; otherwise any (engines run as the operator)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    with passable_tmp("orch-readme-") as base:
        if not reachable_by_others(ROOT / "app" / "refengine"):
            pytest.skip(f"{ROOT} is not reachable by other users: engines could not run from it")
        yield base


def walkthrough_env(project: Path) -> dict[str, str]:
    env = operator_env(ports=8)
    bin_dir = project / ".venv" / "bin"  # the clone's venv: this interpreter, this checkout
    bin_dir.mkdir(parents=True)
    for name, module in (("orch", "-m app.cli"), ("python", "")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {module} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env["ORCH_PORT"] = str(free_port())
    return env


def as_run(script: list[Step], port: int) -> list[Step]:
    return [Step(s.command.replace("localhost:8080", f"localhost:{port}")
                 .replace("make clean", f"make -s -f {ROOT}/Makefile clean"), s.expected)
            for s in script]


def test_the_quickstart_runs_as_written(clone: Path) -> None:
    """Run, try, stop, clean up: every command of the quickstart in order, from a fresh state
    dir, each output as shown; after `orch down` and `make clean` no engine is left."""
    run, trying, cleanup = blocks("Quickstart")
    assert [s.command.split("#")[0].strip() for s in steps(run)] == ["make run"]
    env = walkthrough_env(clone)
    served = MakeRun(clone, env)
    pids: list[int] = []
    try:
        script = as_run(steps(trying), served.port)
        check(script, run_at_a_terminal(clone, env, script), env, clone / "walkthrough.err")
        pids = served.pids()
        assert len(pids) == 1
        script = as_run(steps(cleanup), served.port)
        check(script, run_at_a_terminal(clone, env, script), env, clone / "walkthrough.err")
        served.server.wait(timeout=30)  # `orch down` stopped the server
        assert not (clone / ".orch").exists()

        def ended() -> bool:
            reap_zombies()
            return not any(Path(f"/proc/{pid}").exists() for pid in pids)
        wait_for(ended, timeout=30, what="the engines to end")
    finally:
        served.close(pids)


def test_the_how_tos_run_as_written(clone: Path) -> None:
    """The curl, client, upgrade and rollout how-tos in order, against `make run`, with the
    quickstart's key and header: every command runs, each output as shown (rollout ids and
    totals from a fresh state dir)."""
    env = walkthrough_env(clone)
    served = MakeRun(clone, env)
    try:
        header = steps(blocks("Quickstart")[1])[:2]
        assert header[0].command.startswith("export ORCH_PLATFORM_KEY=") and \
            header[1].command.startswith("H=")
        (curl,) = blocks("Call the API with curl")
        script = as_run(header + steps(curl), served.port)
        check(script, run_at_a_terminal(clone, env, script), env, clone / "walkthrough.err")

        (client,) = blocks("Use the Python client", "python")
        key = (clone / ".orch" / "demo.platform-key").read_text().strip()
        ran = subprocess.run([sys.executable, "-c", client.replace("8080", str(served.port))],
                             cwd=clone, env={**env, "ORCH_PLATFORM_KEY": key},
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr

        upgrade = [s for block in blocks("Upgrade engines and roll out a version") for s in steps(block)]
        script = as_run(header + upgrade, served.port)
        check(script, run_at_a_terminal(clone, env, script), env, clone / "walkthrough.err")
    finally:
        served.close([])
