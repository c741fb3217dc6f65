"""Issue 8, "Done when": the docker template, rendered, is one a real Nomad 1.10 client runs
with a non-root image: a readable key, a writable brain, no `latest`, `Splay: 0`. Checked on
what `orch jobspec render` prints, against the image jobspecs/Dockerfile.refengine builds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from typing import Any

from app.config import Settings
from app.drivers._nomad_volumes import Volumes
from tests.harness import ROOT

CONFIRM_WINDOW_NS = 10_000_000_000  # README: a rotation is confirmed within 10 s or rolled back


def rendered() -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "app.cli", "jobspec", "render", "--product",
                             "acme", "--user", "alice"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def image_user() -> tuple[int, int]:
    dockerfile = (ROOT / "jobspecs" / "Dockerfile.refengine").read_text()
    [user] = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, re.M)
    return int(user[0]), int(user[1])


def test_the_key_is_readable_by_the_images_user() -> None:
    task = rendered()["TaskGroups"][0]["Tasks"][0]
    [key] = [t for t in task["Templates"] if t["DestPath"].endswith("api_key")]
    uid, gid = image_user()
    assert uid != 0   # a non-root image, the case Nomad's default (the agent's user) breaks
    # Nomad writes the file with these owner and mode (template.go); the secrets dir is 0777
    assert (key["Uid"], key["Gid"], key["Perms"]) == (uid, gid, "0600")
    assert task["Env"]["ENGINE_API_KEY_FILE"] == "${NOMAD_SECRETS_DIR}/api_key"


def test_the_brain_volume_is_writable_by_the_images_user() -> None:
    group = rendered()["TaskGroups"][0]
    task = group["Tasks"][0]
    [mount] = task["VolumeMounts"]
    volume = group["Volumes"][mount["Volume"]]
    assert volume["Type"] == "host" and volume["AccessMode"] == "single-node-writer"
    assert mount["Destination"] == task["Env"]["ENGINE_BRAIN_DIR"] and not mount.get("ReadOnly")
    # the driver creates that volume with the mkdir plugin's uid/gid/mode (default settings)
    uid, gid = image_user()
    parameters = Volumes(None, Settings()).parameters  # type: ignore[arg-type]
    assert parameters == {"uid": str(uid), "gid": str(gid), "mode": "0700"}


def test_the_image_has_a_real_tag_the_dockerfile_builds() -> None:
    image = rendered()["TaskGroups"][0]["Tasks"][0]["Config"]["image"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"orch-refengine:{version}" and not image.endswith(":latest")
    build = (ROOT / "jobspecs" / "Dockerfile.refengine").read_text()
    assert f"-t {image} " in build   # the build line the Dockerfile documents makes that tag


def test_a_rotation_is_rendered_within_the_confirm_window() -> None:
    task = rendered()["TaskGroups"][0]["Tasks"][0]
    [key] = [t for t in task["Templates"] if t["DestPath"].endswith("api_key")]
    assert key["Splay"] == 0   # Nomad's default is 5 s of random delay (api/tasks.go)
    assert (key["ChangeMode"], key["ChangeSignal"]) == ("signal", "SIGHUP")
    # the template's own Wait, well inside the window (the client default is min 5 s)
    assert 0 < key["Wait"]["Min"] <= key["Wait"]["Max"] <= CONFIRM_WINDOW_NS // 5
