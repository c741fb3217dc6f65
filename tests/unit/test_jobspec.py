"""Job templates render to what Nomad's API accepts: the right types, the right names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import jobspec, naming
from app.config import ConfigError, Settings
from app.drivers.base import EngineSpec
from app.errors import BadVersion
from tests.doubles.schema import load, validate

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "jobspecs").glob("engine.*.json"))


def _spec(user_id: str = "Alice Smith") -> EngineSpec:
    return EngineSpec(naming.engine_name("acme", user_id), "acme", user_id, "orch-refengine:0.1.0")


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
    with pytest.raises(ConfigError, match="job_idd"):
        jobspec.check(Settings(nomad_jobspec=bad))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"Job": {"ID": "x"}}))
    with pytest.raises(ConfigError, match="bare Job"):
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


def _render(version: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "jobspec", "render", "--product",
                           "acme", "--user", "bob", "--version", version], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_cli_render_prints_the_job() -> None:
    result = _render("img:2", ORCH_ENGINE_IMAGES="img")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["image"] == "img:2"
    assert validate(load("nomad"), "JobRegisterRequest", {"Job": job}) == []


@pytest.mark.parametrize("version, env, why", [
    ("img:2", {}, "ORCH_ENGINE_IMAGES"),                         # a repository not allowed
    ("0.1.0", {"ORCH_STOP_GRACE_S": "45"}, "max_kill_timeout"),  # Nomad would cut it to 30 s
])
def test_cli_render_shows_nothing_the_api_would_refuse(version: str, env: dict[str, str],
                                                        why: str) -> None:
    result = _render(version, **env)
    assert result.returncode == 2 and result.stdout == ""
    assert why in result.stderr and result.stderr.count("\n") == 1


def test_a_stop_grace_nomad_would_cut_or_refuse_stops_start_up() -> None:
    assert Settings.from_env({"ORCH_DRIVER": "nomad", "ORCH_STOP_GRACE_S": "30"})
    assert Settings.from_env({"ORCH_STOP_GRACE_S": "45"})   # the local driver has no cap
    with pytest.raises(ConfigError, match=r"ORCH_STOP_GRACE_S=45 is longer than "
                                          r"ORCH_NOMAD_MAX_KILL_TIMEOUT_S=30"):
        Settings.from_env({"ORCH_DRIVER": "nomad", "ORCH_STOP_GRACE_S": "45"})
    assert Settings.from_env({"ORCH_DRIVER": "nomad", "ORCH_STOP_GRACE_S": "45",
                              "ORCH_NOMAD_MAX_KILL_TIMEOUT_S": "60"})
    with pytest.raises(ConfigError, match="progress_deadline"):
        Settings.from_env({"ORCH_DRIVER": "nomad", "ORCH_STOP_GRACE_S": "700",
                           "ORCH_NOMAD_MAX_KILL_TIMEOUT_S": "900"})


# ---- images, versions, and what Nomad would interpolate ---------------------------

@pytest.mark.parametrize("version, image", [
    ("0.2.0", "orch-refengine:0.2.0"),                       # a tag of ORCH_ENGINE_IMAGE's repository
    ("orch-refengine:0.2.0", "orch-refengine:0.2.0"),
    ("ref+fault-crash", "orch-refengine:ref+fault-crash"),   # the reference engine's test tokens
    ("registry.example:5000/team/engine:1.2", "registry.example:5000/team/engine:1.2"),
])
def test_accepted_versions_and_their_images(version: str, image: str) -> None:
    settings = Settings(engine_images=("registry.example:5000/team/engine",))
    jobspec.check_version(settings, version)
    assert jobspec.image_for(settings, version) == image


@pytest.mark.parametrize("version", [
    "orch-refengine:latest", "other/engine:1", "v${attr.x}", "a b",
    "orch-refengine:1${x}", "registry.example:5000/team/engine",
])
def test_refused_versions(version: str) -> None:
    settings = Settings(engine_images=("registry.example:5000/team/engine",))
    with pytest.raises(BadVersion):
        jobspec.check_version(settings, version)


def test_no_product_string_reaches_nomad_in_a_form_it_would_expand() -> None:
    job = jobspec.render_job(Settings(), EngineSpec("e-acme-x-0123456789ab", "acme",
                                                    "u${node.unique.name}%", "0.1.0"))
    text = json.dumps(job)
    assert "${node.unique.name}" not in text and "u%24{node.unique.name}%25" in text
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["Config"]["image"] == "orch-refengine:0.1.0"
    tmpl = task["Templates"][0]
    assert (tmpl["Uid"], tmpl["Gid"], tmpl["Perms"], tmpl["Splay"]) == (65534, 65534, "0600", 0)
    assert tmpl["Wait"]["Min"] < tmpl["Wait"]["Max"] <= 2_000_000_000


def test_engine_images_setting_is_checked() -> None:
    from app.config import ConfigError
    assert Settings.from_env({"ORCH_ENGINE_IMAGES": "a/b, c"}).engine_images == ("a/b", "c")
    with pytest.raises(ConfigError, match="ORCH_ENGINE_IMAGES"):
        Settings.from_env({"ORCH_ENGINE_IMAGES": "a/b:1"})
    with pytest.raises(ConfigError, match="ORCH_NOMAD_VOLUME_MODE"):
        Settings.from_env({"ORCH_NOMAD_VOLUME_MODE": "999"})
    assert Settings().engine_image.rsplit(":", 1)[1] not in ("", "latest")
