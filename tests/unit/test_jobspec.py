"""Job templates render to what Nomad's API accepts: the right types, the right names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import jobspec, naming
from app.config import Settings
from app.drivers.base import EngineSpec
from tests.doubles.schema import load, validate

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "jobspecs").glob("engine.*.json"))


def _spec(user_id: str = "Alice Smith") -> EngineSpec:
    return EngineSpec(naming.engine_name("acme", user_id), "acme", user_id, "orch-refengine:latest")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_template_renders_to_a_valid_job_register_request(template: Path) -> None:
    settings = Settings(nomad_jobspec=template, stop_grace_s=7.5)
    job = jobspec.render_job(settings, _spec(), volume_path="/srv/volumes/x")
    assert validate(load("nomad"), "JobRegisterRequest", {"Job": job}) == []
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["KillTimeout"] == 7_500_000_000 and isinstance(task["KillTimeout"], int)
    check = job["TaskGroups"][0]["Services"][0]["Checks"][0]
    assert check["Interval"] == jobspec.CHECK_INTERVAL_NS and isinstance(check["Timeout"], int)
    # ours are filled in; Nomad's runtime interpolation is left for the Nomad client
    text = json.dumps(job)
    assert "${NOMAD_PORT_http}" in text and "${NOMAD_SECRETS_DIR}" in text
    assert not jobspec._OURS.search(text)
    assert job["Meta"]["user_id"] == "Alice Smith" and job["ID"] == _spec().name
    assert f'nomadVar \\"nomad/jobs/{job["ID"]}\\"' in text


def test_raw_exec_passes_the_volume_path_and_mounts_nothing() -> None:
    settings = Settings(nomad_jobspec=ROOT / "jobspecs" / "engine.raw_exec.json")
    task = jobspec.render_job(settings, _spec(), volume_path="/srv/v1")["TaskGroups"][0]["Tasks"][0]
    assert task["Env"]["ENGINE_BRAIN_DIR"] == "/srv/v1" and "VolumeMounts" not in task
    assert task["Config"]["command"] == sys.executable


def test_namespace_and_region_come_from_the_environment() -> None:
    settings = dataclasses.replace(Settings(), nomad_namespace="engines", nomad_region="eu")
    job = jobspec.render_job(settings, _spec())
    assert (job["Namespace"], job["Region"]) == ("engines", "eu")


def test_an_unknown_placeholder_stops_loading(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ID": "${job_idd}", "Name": "${NOMAD_JOB_ID}"}))
    with pytest.raises(jobspec.JobspecError, match="job_idd"):
        jobspec.check(Settings(nomad_jobspec=bad))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"Job": {"ID": "x"}}))
    with pytest.raises(jobspec.JobspecError, match="bare Job"):
        jobspec.check(Settings(nomad_jobspec=wrapped))


def test_a_bad_template_stops_start_up_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "app.cli", "reconcile"], cwd=ROOT, text=True,
                            capture_output=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "ORCH_DRIVER": "nomad",
                                 "ORCH_NOMAD_JOBSPEC": str(bad), "ORCH_STATE_DIR": str(tmp_path),
                                 "ORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'orch.db'}"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ORCH_NOMAD_JOBSPEC" in result.stderr


def test_cli_render_prints_the_job() -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "jobspec", "render", "--product", "acme",
                             "--user", "bob", "--version", "img:2"], cwd=ROOT, text=True,
                            capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "img:2"
    assert validate(load("nomad"), "JobRegisterRequest", {"Job": job}) == []
