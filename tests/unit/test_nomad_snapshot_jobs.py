"""The Nomad driver's snapshot pieces that need no cluster: the restore task derived from the
template's `snapshot` task, the names of brain volume generations, and the sidecar's
configuration (no secret in the job)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app import errors, jobspec
from app.config import Settings
from app.drivers import _nomad_sidecar as sidecar
from app.drivers import _nomad_snapshots as snaps
from app.drivers.base import EngineSpec
from tests.harness import ROOT

SPEC = EngineSpec("e-acme-ada-0123456789ab", "acme", "ada", "0.1.0")


def settings(template: str, **extra: Any) -> Settings:
    return Settings(driver="nomad", nomad_jobspec=ROOT / "jobspecs" / template, **extra)


def tasks(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["Name"]: t for t in job["TaskGroups"][0]["Tasks"]}


@pytest.mark.parametrize("template", ["engine.docker.json", "engine.raw_exec.json"])
def test_the_restore_task_is_the_sidecar_run_once_before_the_engine(template: str) -> None:
    job = jobspec.render_job(settings(template), SPEC, volume_path="/v/1", volume_name=f"{SPEC.name}-r2")
    snapshot_var = f"nomad/jobs/{SPEC.name}/engine/snapshot"
    restore_var = f"nomad/jobs/{SPEC.name}/engine/restore"
    restoring = snaps.with_restore_task(job, restore_var, snapshot_var)

    assert [t["Name"] for t in restoring["TaskGroups"][0]["Tasks"]] == ["restore", "engine", "snapshot"]
    restore, sidecar = tasks(restoring)["restore"], tasks(restoring)["snapshot"]
    assert restore["Lifecycle"] == {"Hook": "prestart", "Sidecar": False}
    assert sidecar["Lifecycle"] == {"Hook": "poststart", "Sidecar": True}
    assert restore["Driver"] == sidecar["Driver"]
    assert restore["Env"]["ORCH_SIDECAR_MODE"] == "restore"
    assert restore["Env"]["ORCH_SIDECAR_BRAIN"] == sidecar["Env"]["ORCH_SIDECAR_BRAIN"]
    assert "ORCH_SIDECAR_PORT" not in restore["Env"] and "ports" not in restore["Config"]
    assert restore.get("VolumeMounts") == sidecar.get("VolumeMounts")
    (rendered,) = restore["Templates"]
    assert f'nomadVar "{restore_var}"' in rendered["EmbeddedTmpl"]
    assert f'nomadVar "{snapshot_var}"' in tasks(restoring)["snapshot"]["Templates"][0]["EmbeddedTmpl"]
    assert tasks(job) == {n: t for n, t in tasks(restoring).items() if n != "restore"}  # a copy
    volume = restoring["TaskGroups"][0]["Volumes"]["brain"]
    assert volume["Source"] == f"{SPEC.name}-r2"  # the job asks for this generation only


def test_no_secret_reaches_the_job_and_only_the_sidecar_reads_its_variable() -> None:
    job = jobspec.render_job(settings("engine.docker.json"), SPEC)
    text = json.dumps(job)
    assert "AWS_" not in text and "token" not in text
    engine, sidecar = tasks(job)["engine"], tasks(job)["snapshot"]
    assert "snapshot" not in json.dumps(engine["Templates"])
    assert sidecar["Templates"][0]["ChangeMode"] == "noop"
    assert sidecar["Templates"][0]["DestPath"].startswith("secrets/")
    assert jobspec.task_var_path(SPEC.name, "engine", "snapshot") in sidecar["Templates"][0]["EmbeddedTmpl"]
    assert sidecar["Config"]["image"] == Settings().snapshot_image


def test_a_template_without_the_sidecar_turns_snapshots_off(tmp_path: Path) -> None:
    template = json.loads((ROOT / "jobspecs" / "engine.raw_exec.json").read_text())
    group = template["TaskGroups"][0]
    group["Tasks"] = [t for t in group["Tasks"] if t["Name"] != "snapshot"]
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(template))
    plain = Settings(driver="nomad", nomad_jobspec=path)
    assert jobspec.sidecar_group(plain) is None and snaps.var_paths(plain, SPEC.name) == []
    with pytest.raises(errors.InvalidRequest, match="no `snapshot` task"):
        snaps.with_restore_task(jobspec.render_job(plain, SPEC), "a", "b")


def test_volume_generations_map_back_to_their_engine() -> None:
    assert snaps.volume_name(SPEC.name, 0) == SPEC.name
    assert snaps.volume_name(SPEC.name, 3) == f"{SPEC.name}-r3"
    for generation in (0, 1, 12):
        name = snaps.volume_name(SPEC.name, generation)
        assert snaps.engine_of(name) == SPEC.name and snaps.generation_of(name) == generation
    # a user slug that looks like a generation is still part of the engine's name
    odd = "e-acme-x-r1-fedcba987654"
    assert snaps.engine_of(odd) == odd and snaps.engine_of(f"{odd}-r2") == odd
    assert snaps.engine_of("brain-of-someone-else") is None
    assert snaps.engine_of(f"{SPEC.name}-rx") is None


def test_the_sidecar_config_names_the_store_and_a_fresh_token(tmp_path: Path) -> None:
    store = sidecar.store_settings(Settings(state_dir=tmp_path))
    assert store == {"store": (tmp_path / "snapshots").resolve().as_uri()}
    first, second = (json.loads(sidecar.sidecar_config(store, SPEC.name)) for _ in range(2))
    assert first["prefix"] == f"engines/{SPEC.name}/" and first["token"] != second["token"]
    assert first["copy_timeout_s"] == sidecar.COPY_TIMEOUT_S   # the sidecar stops a copy then
    # Only a change other than the token makes a written config stale (and written again).
    written = {"Items": {"config": json.dumps(first)}}
    assert not sidecar.stale(written, store, SPEC.name)
    assert sidecar.stale(written, {"store": "s3://b/p", "aws": {"AWS_REGION": "x"}}, SPEC.name)
    assert sidecar.stale({"Items": {"config": json.dumps({**first, "copy_timeout_s": 1})}},
                         store, SPEC.name)
    assert sidecar.stale({"Items": {"config": "{"}}, store, SPEC.name)
    # Other credentials: only a newer resolution than the written one rewrites them.
    s3 = {"store": "s3://b/p", "aws": {"AWS_ACCESS_KEY_ID": "a"}, "resolved_at": 100.0}
    config = json.loads(sidecar.sidecar_config(s3, SPEC.name))
    def renewed(at: float) -> dict[str, Any]:
        return {**s3, "aws": {"AWS_ACCESS_KEY_ID": "b"}, "resolved_at": at}
    assert not sidecar.stale({"Items": {"config": json.dumps(config)}}, {**s3, "resolved_at": 400.0},
                             SPEC.name)
    assert sidecar.stale({"Items": {"config": json.dumps(config)}}, renewed(400.0), SPEC.name)
    assert not sidecar.stale({"Items": {"config": json.dumps(config)}}, renewed(50.0), SPEC.name)
    restore = json.loads(sidecar.restore_config(store, SPEC.name, "e-acme-bob-0123456789ab", "s-1"))
    assert restore["source_prefix"] == "engines/e-acme-bob-0123456789ab/" and restore["snapshot"] == "s-1"
    assert "token" not in restore
    alloc = {"AllocatedResources": {"Shared": {"Ports": [
        {"Label": "http", "Value": 31000, "HostIP": "127.0.0.1"},
        {"Label": "snapshot", "Value": 31001, "HostIP": "127.0.0.1"}]}}}
    assert sidecar.sidecar_url(alloc) == "http://127.0.0.1:31001"
    assert sidecar.sidecar_url({"AllocatedResources": None}) is None


def test_store_credentials_are_the_orchestrators_as_boto3_resolves_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in (("AWS_ACCESS_KEY_ID", "AKIA1"), ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
                       ("AWS_REGION", "eu-west-3"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    store = sidecar.store_settings(Settings(snapshot_store="s3://b/p"))
    assert store == {"store": "s3://b/p", "aws": {
        "AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_REGION": "eu-west-3",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}
