"""The Python client installs and runs with httpx alone: the package's own dependencies are
the client's, and the client, in an interpreter that can import httpx, httpx's dependencies and
this project's `app` and nothing else, talks to a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness import ROOT, Orchestrator

SERVER_ONLY = ("msgspec", "starlette", "uvicorn", "peewee", "cryptography", "orjson", "nomad")


def test_the_packages_own_dependencies_are_the_clients() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["httpx"]
    server = {d.split(">")[0].split("[")[0] for d in project["optional-dependencies"]["server"]}
    assert set(SERVER_ONLY) - {"nomad"} <= server | {"peewee"} and "python-nomad" in server


def test_the_clients_routes_are_the_endpoint_tables() -> None:
    from app.api.spec import ENDPOINTS
    from app.client._routes import BY_NAME

    assert {e.name: (e.method, e.path, e.also_ok) for e in ENDPOINTS} == {
        name: tuple(route) for name, route in BY_NAME.items()}


def _httpx_and_its_dependencies(into: Path) -> None:
    """Links to the top-level packages of httpx and of what it requires, from its installed
    metadata (extras left out; requirements for other Pythons are not installed)."""
    import re
    from importlib import metadata

    tops: dict[str, list[str]] = {}
    for top, dists in metadata.packages_distributions().items():
        for dist in dists:
            tops.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), []).append(top)
    wanted, todo = set(), ["httpx"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in wanted or name not in tops:
            continue
        wanted.add(name)
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]
                 for r in metadata.requires(name) or () if "extra ==" not in r]
    lib = Path(metadata.distribution("httpx").locate_file(""))
    for name in wanted:
        for top in tops[name]:
            found = lib / top if (lib / top).exists() else lib / f"{top}.py"
            (into / found.name).symlink_to(found)
    (into / "app").symlink_to(ROOT / "app")


ISOLATED = """
import json, sys
sys.path[:0] = [sys.argv[1]]
from app.client import Client, EngineNotFound
with Client(sys.argv[2], sys.argv[3], trust_env=False, timeout=60) as orch:
    admission = orch.admit("isolated", auto_provision=True)
    try:
        orch.get("nobody")
        missing = None
    except EngineNotFound as exc:
        missing = exc.code
    orch.destroy("isolated")
try:
    import msgspec  # noqa: F401
    reachable = True
except ImportError:
    reachable = False
print(json.dumps({"admitted": admission.admitted, "missing": missing, "msgspec": reachable,
                  "server_modules": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[4:]))}))
"""


def test_the_client_runs_on_httpx_alone(orch: Orchestrator, tmp_path: Path) -> None:
    path = tmp_path / "path"
    path.mkdir()
    _httpx_and_its_dependencies(path)
    # -I: no user site, no environment, no script dir; -S: no site-packages at all.
    result = subprocess.run([sys.executable, "-I", "-S", "-c", ISOLATED, str(path), orch.url,
                             orch.keys["acme"], *SERVER_ONLY], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"admitted": True, "missing": "ENGINE_NOT_FOUND",
                                         "msgspec": False, "server_modules": []}


def test_orch_without_the_server_libraries_says_what_to_install(tmp_path: Path) -> None:
    path = tmp_path / "path"
    path.mkdir()
    _httpx_and_its_dependencies(path)
    code = "import sys; sys.path[:0] = [sys.argv[1]]; from app.cli_main import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(path)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("orch: ") and "engine-orchestrator[server]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
