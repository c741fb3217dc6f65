"""The routes the client calls, by endpoint name: method, path, and the error statuses that are
answers there. A copy of what the endpoint table (app/api/spec.py) says, kept here so that the
client needs httpx and nothing of the server (msgspec, Starlette); tests/unit/test_client_install.py
fails when the copy and the table disagree.
"""

from __future__ import annotations

from typing import NamedTuple


class Route(NamedTuple):
    method: str
    path: str  # {user_id} or {rollout_id} are the path parameters
    also_ok: tuple[int, ...] = ()  # statuses answered with the answer, not an error


BY_NAME: dict[str, Route] = {
    "admit": Route("POST", "/engines/{user_id}/admit"),
    "provision": Route("POST", "/engines/provision"),
    "list": Route("GET", "/engines"),
    "get": Route("GET", "/engines/{user_id}"),
    "destroy": Route("DELETE", "/engines/{user_id}"),
    "start": Route("POST", "/engines/{user_id}/start"),
    "stop": Route("POST", "/engines/{user_id}/stop"),
    "rotate_key": Route("POST", "/engines/{user_id}/rotate-key"),
    "upgrade": Route("POST", "/engines/{user_id}/upgrade"),
    "snapshot": Route("POST", "/engines/{user_id}/snapshots"),
    "snapshots": Route("GET", "/engines/{user_id}/snapshots"),
    "restore": Route("POST", "/engines/{user_id}/restore"),
    "export_brain": Route("GET", "/engines/{user_id}/brain"),
    "import_brain": Route("POST", "/engines/{user_id}/brain"),
    "events": Route("GET", "/engines/{user_id}/events"),
    "start_rollout": Route("POST", "/rollouts"),
    "rollouts": Route("GET", "/rollouts"),
    "rollout": Route("GET", "/rollouts/{rollout_id}"),
    "rollout_events": Route("GET", "/rollouts/{rollout_id}/events"),
    "pause_rollout": Route("POST", "/rollouts/{rollout_id}/pause"),
    "resume_rollout": Route("POST", "/rollouts/{rollout_id}/resume"),
    "abort_rollout": Route("POST", "/rollouts/{rollout_id}/abort"),
    "healthz": Route("GET", "/healthz"),
    "readyz": Route("GET", "/readyz", (503,)),
    "metrics": Route("GET", "/metrics"),
    "openapi": Route("GET", "/openapi.json"),
}
