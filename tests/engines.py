"""Looking at engines from the outside: their processes, logs and brains."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import reap_zombies
from tests.harness import Orchestrator


def proc_state(pid: int) -> str:
    """'running', 'paused' (SIGSTOPped) or 'gone' (absent or a zombie)."""
    reap_zombies()
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return "gone"
    code = raw[raw.rindex(")") + 2:].split()[0]
    if code in ("Z", "X"):
        return "gone"
    return "paused" if code in ("T", "t") else "running"


def engine_name(orch: Orchestrator, user_id: str) -> str:
    return orch.rows("SELECT name FROM engine WHERE user_id = ?", user_id)[0][0]


def brain_dir(orch: Orchestrator, user_id: str) -> Path:
    if orch.driver == "nomad":  # the host volume's directory
        import json

        state = orch.rows("SELECT driver_state FROM engine WHERE user_id = ?", user_id)[0][0]
        return Path(json.loads(state)["volume_path"])
    return orch.state_dir / "brains" / engine_name(orch, user_id)


def engine_log(orch: Orchestrator, user_id: str) -> str:
    if orch.driver == "nomad":  # through Nomad's log API
        from tests.scheduler import task_log

        return task_log(orch.env["NOMAD_ADDR"], engine_name(orch, user_id))
    return (orch.state_dir / "run" / engine_name(orch, user_id) / "engine.log").read_text()


def nothing_left(orch: Orchestrator) -> dict[str, list]:
    """What the driver still holds for engines: {} when nothing (no row is checked here)."""
    if orch.driver == "nomad":
        from tests.scheduler import leftovers

        return {k: v for k, v in leftovers(orch.env["NOMAD_ADDR"]).items() if v}
    left = {"port_leases": orch.rows("SELECT * FROM port_lease"),
            "processes": list(engine_processes(orch).items())}
    return {k: v for k, v in left.items() if v}


def engine_processes(orch: Orchestrator) -> dict[str, list[int]]:
    """Every live engine process of this orchestrator, by engine name, found from /proc (on
    Nomad: the `engine` task pids of every allocation the double has, by job, that are still
    alive)."""
    from app.drivers._process import engines_under

    reap_zombies()
    if orch.driver == "nomad":
        return _nomad_task_processes(orch)
    return engines_under((orch.state_dir / "brains").resolve())


def _nomad_task_processes(orch: Orchestrator) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    if orch.stack is not None:  # the double knows its tasks' pids
        for alloc in orch.stack.state()["allocs"]:
            pid = alloc["pids"].get("engine")   # the engine task's, not its sidecar's
            if pid is not None and proc_state(pid) != "gone":
                found.setdefault(alloc["job"], []).append(pid)
        return found
    # Real agents: engines on this host whose brain is one of our host volumes (raw_exec; a
    # docker task sees its brain as /brain and is not found this way).
    from app.drivers._process import engines_under
    from tests.scheduler import get

    nomad = orch.env["NOMAD_ADDR"]
    for stub in get(nomad, "/v1/volumes", type="host") or []:
        if not stub["Name"].startswith("e-"):
            continue
        path = Path(get(nomad, f"/v1/volume/host/{stub['ID']}").get("HostPath") or "/")
        pids = engines_under(path.parent).get(path.name, []) if path.name else []
        if pids:
            found[stub["Name"]] = pids
    return found


def assert_consistent(orch: Orchestrator) -> None:
    """Registry and machine agree: one process per running/sleeping row and none elsewhere,
    a brain directory and a port per row and none without one (on Nomad: see
    `_assert_consistent_nomad`)."""
    import json

    if orch.driver == "nomad":
        return _assert_consistent_nomad(orch)
    rows = {name: (status, json.loads(state or "{}")) for name, status, state in
            orch.rows("SELECT name, status, driver_state FROM engine")}
    processes = engine_processes(orch)
    for name, pids in processes.items():
        assert name in rows, f"engine process {pids} of {name} has no row"
        assert len(pids) == 1, f"{name} has {len(pids)} processes"
        assert rows[name][0] in ("running", "sleeping"), f"{name} runs but is {rows[name][0]}"
        assert rows[name][1].get("pid") == pids[0], f"{name}: row and process disagree"
    for name, (status, _) in rows.items():
        if status in ("running", "sleeping"):
            assert name in processes, f"{name} is {status} but has no process"
    root = orch.state_dir / "brains"
    brains = {p.name for p in root.iterdir()} if root.exists() else set()
    assert brains == set(rows), f"brains {brains} vs rows {set(rows)}"
    ports = {name for (name,) in orch.rows("SELECT engine_name FROM port_lease")}
    assert ports == set(rows), f"port leases {ports} vs rows {set(rows)}"


TERMINAL = ("complete", "failed", "lost")


def _assert_consistent_nomad(orch: Orchestrator) -> None:
    """Registry and Nomad/Consul agree, read through their HTTP APIs (and, with the double,
    its /state and /proc for the task processes):

    - a running or sleeping row has exactly one non-terminal allocation of its job, the one
      its driver state names, running, with a live process; a stopped or failed row has none;
    - every job with Meta managed_by=orch, every host volume e-... (of any generation) and
      every variable nomad/jobs/e-... (the sidecar's below it too) belongs to a row, and
      every row has its volume and its variable;
    - a running row's Consul service has a passing instance at the row's URL;
    - with the double: no live task process outside a running allocation of a row's job."""
    import json

    from app.drivers._nomad_snapshots import engine_of
    from app.jobspec import var_path
    from tests.scheduler import get, leftovers, service

    nomad, consul = orch.env["NOMAD_ADDR"], orch.env["CONSUL_HTTP_ADDR"]
    rows = {name: (status, json.loads(state or "{}"), url) for name, status, state, url in
            orch.rows("SELECT name, status, driver_state, url FROM engine")}
    reap_zombies()
    pids = {a["id"]: list(a["pids"].values()) for a in orch.stack.state()["allocs"]} \
        if orch.stack is not None else None
    live: set[str] = set()  # the allocations running for running/sleeping rows
    for name, (status, state, url) in rows.items():
        allocs = [a for a in get(nomad, f"/v1/job/{name}/allocations")
                  if a["ClientStatus"] not in TERMINAL]
        if status in ("running", "sleeping"):
            assert len(allocs) == 1, f"{name} is {status} with {len(allocs)} live allocations"
            (alloc,) = allocs
            assert alloc["ClientStatus"] == "running", f"{name}: allocation {alloc['ClientStatus']}"
            assert state.get("alloc") == alloc["ID"], f"{name}: row and allocation disagree"
            if pids is not None:
                assert [p for p in pids.get(alloc["ID"], []) if proc_state(p) != "gone"], \
                    f"{name} is {status} but its task has no live process"
            live.add(alloc["ID"])
        elif status in ("stopped", "failed"):
            assert not allocs, f"{name} is {status} with allocations " \
                               f"{[(a['ID'], a['ClientStatus']) for a in allocs]}"
        volume = state.get("volume")
        assert volume and get_or_none(nomad, f"/v1/volume/host/{volume}") is not None, \
            f"{name} has no host volume ({volume})"
        assert get_or_none(nomad, f"/v1/var/{var_path(name)}") is not None, \
            f"{name} has no variable"
        if status == "running":
            passing = [e for e in service(consul, name)
                       if all(c["Status"] == "passing" for c in e["Checks"])]
            addresses = {f"http://{e['Service']['Address'] or e['Node']['Address']}:{e['Service']['Port']}"
                         for e in passing}
            assert url in addresses, f"{name}: url {url} vs passing instances {addresses}"
    left = leftovers(nomad)
    # a stub carries Meta only with ?meta=true (command/agent/job_endpoint.go)
    ours = [j["ID"] for j in get(nomad, "/v1/jobs", prefix="e-", meta="true")
            if (j.get("Meta") or {}).get("managed_by") == "orch"]
    assert set(ours) <= set(rows), f"jobs without a row: {set(ours) - set(rows)}"
    volumes = {engine_of(v) or v for v in left["volumes"]}   # a restore's <name>-r<N> too
    assert volumes <= set(rows), f"volumes without a row: {volumes - set(rows)}"
    # nomad/jobs/<name>, and the sidecar's nomad/jobs/<name>/<group>/snapshot
    variables = {v[len(var_path("")):].split("/")[0] for v in left["variables"]}
    assert variables <= set(rows), f"variables without a row: {variables - set(rows)}"
    if pids is not None:
        stray = {alloc: [p for p in found if proc_state(p) != "gone"]
                 for alloc, found in pids.items() if alloc not in live}
        stray = {alloc: found for alloc, found in stray.items() if found}
        assert not stray, f"task processes outside a live allocation of a row: {stray}"
        known = {p for found in pids.values() for p in found}
        unknown = [p for p in orch.stack.stragglers() if p not in known]
        assert not unknown, f"processes of the double's tasks it does not know: {unknown}"


def get_or_none(base: str, path: str) -> object:
    import httpx

    response = httpx.get(base + path, timeout=10, trust_env=False)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()
