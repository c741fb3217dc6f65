"""The orchestrator's side of the snapshot sidecar (app.snapshots.sidecar): the configuration
its Nomad Variable carries (the store, its credentials, a bearer token) and the calls to it.

The variable is written before every launch. Before a call, the configuration it holds is
compared with what this orchestrator would write now: when the store's credentials were renewed
(a role's expire within hours) or the store itself changed, it is written again with a new
token, and the call waits until the sidecar answers to that token, i.e. until Nomad has
rendered the new file. A long-running engine's copies thus never use credentials that expired
after its launch, nor a store the orchestrator no longer writes manifests to.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from app import errors, jobspec
from app.config import Settings
from app.drivers._nomad_api import NomadAPI, VariableConflict
from app.drivers.base import EngineSpec, SchedulerUnavailable

IO = Callable[..., Awaitable[Any]]

STORE_SETTINGS_TTL_S = 300.0
COPY_TIMEOUT_S = 900.0  # a copy of a large brain to a remote bucket
# The sidecar stops a copy at COPY_TIMEOUT_S and answers; the call waits that long and a margin,
# so it hears why rather than timing out while the copy still runs.
ANSWER_MARGIN_S = 30.0
CALL_TIMEOUT_S = 30.0
# How long a rewritten config may take to reach the sidecar: the template's Wait (up to 1 s in
# our job templates) after Nomad's variable watch fires, with room for an operator's longer one.
RENDER_WAIT_S = 20.0
RENDER_POLL_S = 0.2


def store_settings(settings: Settings) -> dict[str, Any]:
    """The store and its credentials as the orchestrator reaches it (boto3's resolution:
    environment, profile, instance role...), for the sidecar's variable."""
    url = settings.snapshot_store_url
    found: dict[str, Any] = {"store": url}
    if url.startswith("s3://"):
        found["aws"] = _aws()
    return found


def _aws() -> dict[str, str]:
    """The settings app.snapshots.store's AWS_ARGUMENTS names, as boto3 resolves them here:
    these values, not the orchestrator's environment, are what the sidecar gets."""
    import boto3  # only when the store is S3, as app.snapshots.store does

    session = boto3.session.Session()
    aws: dict[str, str] = {}
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        aws.update(AWS_ACCESS_KEY_ID=frozen.access_key or "",
                   AWS_SECRET_ACCESS_KEY=frozen.secret_key or "", AWS_SESSION_TOKEN=frozen.token or "")
    # botocore's own name is AWS_DEFAULT_REGION; AWS_REGION is the SDKs' newer one
    region = session.region_name or os.environ.get("AWS_REGION")
    if region:
        aws["AWS_REGION"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        aws["AWS_ENDPOINT_URL"] = endpoint
    return {k: v for k, v in aws.items() if v}


def sidecar_config(store: dict[str, Any], name: str) -> str:
    return json.dumps({**store, "prefix": f"engines/{name}/", "token": secrets.token_hex(32),
                       "copy_timeout_s": COPY_TIMEOUT_S})


def restore_config(store: dict[str, Any], name: str, source: str, snapshot_id: str) -> str:
    return json.dumps({**store, "prefix": f"engines/{name}/", "source_prefix": f"engines/{source}/",
                       "snapshot": snapshot_id})


def sidecar_url(alloc: dict[str, Any]) -> str | None:
    """Where the allocation's `snapshot` port is (AllocatedResources.Shared.Ports)."""
    shared = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
    for port in shared.get("Ports") or []:
        if port.get("Label") == jobspec.SNAPSHOT_TASK and port.get("Value"):
            return f"http://{port.get('HostIP') or '127.0.0.1'}:{port['Value']}"
    return None


def token_of(variable: dict[str, Any] | None) -> str | None:
    try:
        token = json.loads(((variable or {}).get("Items") or {}).get("config") or "")["token"]
    except (ValueError, KeyError, TypeError):
        return None
    return token if isinstance(token, str) else None


async def call_sidecar(http: httpx.AsyncClient, spec: EngineSpec, url: str, token: str,
                       method: str, path: str, timeout: float) -> dict[str, Any]:
    """One call to the sidecar; its refusals as the domain errors they mean."""
    try:
        answer = await http.request(method, url + path, timeout=timeout,
                                    headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise SchedulerUnavailable(f"the snapshot sidecar of {spec.name} did not answer "
                                   f"({type(exc).__name__})") from None
    try:
        body: dict[str, Any] = answer.json()
    except ValueError:
        body = {}
    if answer.status_code == 200:
        return body
    error = body.get("error") or {}
    message = f"the snapshot sidecar of {spec.name}: {error.get('message') or answer.status_code}"
    if answer.status_code == 409:
        raise errors.EngineBusy(message)
    if error.get("code") == "SNAPSHOT_STORE_FAILED":
        raise errors.SnapshotStoreFailed(message)
    raise errors.DriverFailed(message)


class Sidecars:
    """Writes the sidecars' variables and calls the sidecars with the token they hold."""

    def __init__(self, settings: Settings, api: NomadAPI, io: IO, http: httpx.AsyncClient,
                 var: Callable[[str, str], str]):
        self.settings, self.api, self.io, self.http, self.var = settings, api, io, http, var
        self._store: tuple[float, dict[str, Any]] | None = None

    def store(self) -> dict[str, Any]:
        # Resolved again now and then (a role's credentials expire), without paying boto3's
        # resolution on every launch and call.
        if self._store is None or time.monotonic() - self._store[0] > STORE_SETTINGS_TTL_S:
            resolved = {**store_settings(self.settings), "resolved_at": round(time.time(), 3)}
            self._store = (time.monotonic(), resolved)
        return self._store[1]

    async def prepare(self, name: str, restoring: dict[str, Any] | None) -> None:
        """Before a launch: the sidecar's variable (a new token, the current credentials),
        and the restore's while one is due."""
        store = await self.io(self.store)
        await self.io(self.api.put_variable, self.var(name, jobspec.SNAPSHOT_TASK),
                      {"config": sidecar_config(store, name)})
        if restoring:
            config = restore_config(store, name, restoring["source"], restoring["snapshot"])
            await self.io(self.api.put_variable, self.var(name, jobspec.RESTORE_TASK),
                          {"config": config})

    async def call(self, spec: EngineSpec, alloc: dict[str, Any] | None, method: str, path: str,
                   timeout: float) -> dict[str, Any]:
        url = sidecar_url(alloc) if alloc and alloc.get("ClientStatus") == "running" else None
        if url is None:
            raise errors.EngineNotRunning(f"engine {spec.name} has no running allocation to "
                                          f"copy its brain from")
        token = await self._current_token(spec, url)
        return await call_sidecar(self.http, spec, url, token, method, path, timeout)

    async def _current_token(self, spec: EngineSpec, url: str) -> str:
        """The token of a config as this orchestrator would write it now (written again, and
        taken up by the sidecar, when it was not)."""
        path = self.var(spec.name, jobspec.SNAPSHOT_TASK)
        variable = await self.io(self.api.variable, path)
        token = token_of(variable)
        if variable is None or token is None:
            raise SchedulerUnavailable(f"the snapshot variable of {spec.name} is missing")
        store = await self.io(self.store)
        if not stale(variable, store, spec.name):
            return token
        try:
            written = await self.io(self.api.put_variable, path,
                                    {"config": sidecar_config(store, spec.name)},
                                    variable.get("ModifyIndex"))
        except VariableConflict:   # another writer's config, current as of its write
            written = await self.io(self.api.variable, path)
        token = token_of(written)
        if token is None:
            raise SchedulerUnavailable(f"the snapshot variable of {spec.name} is missing")
        await self._taken_up(spec, url, token)
        return token

    async def _taken_up(self, spec: EngineSpec, url: str, token: str) -> None:
        """Until the sidecar answers to `token` (401 while it still reads the old file)."""
        deadline = time.monotonic() + RENDER_WAIT_S
        while True:
            try:
                answer = await self.http.get(url + "/v1/fingerprint", timeout=CALL_TIMEOUT_S,
                                             headers={"Authorization": f"Bearer {token}"})
                if answer.status_code != 401:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(
                    f"the snapshot sidecar of {spec.name} has not taken up its renewed "
                    f"configuration within {RENDER_WAIT_S:g} s")
            await asyncio.sleep(RENDER_POLL_S)


def stale(variable: dict[str, Any], store: dict[str, Any], name: str) -> bool:
    """The variable's config differs, but for its token, from what would be written now.
    When only the credentials differ, the newer resolution wins: replicas with credentials of
    their own (an instance role each) then rewrite it once per resolution, not on every call."""
    try:
        written = json.loads((variable.get("Items") or {}).get("config") or "")
    except ValueError:
        return True
    if not isinstance(written, dict):
        return True
    mine = json.loads(sidecar_config(store, name))
    differs = {k for k in {*written, *mine} - {"token", "resolved_at"} if written.get(k) != mine.get(k)}
    if differs != {"aws"}:
        return bool(differs)
    try:
        return float(written.get("resolved_at") or 0) < float(mine.get("resolved_at") or 0)
    except (TypeError, ValueError):
        return True
