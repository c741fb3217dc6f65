"""Talking to engines over HTTP: health, confirming which key an engine accepts, and telling
a warm pool's engine its user.

Every call has a deadline for the whole exchange (asyncio.wait_for), not only httpx's
per-read timeout: an engine that dribbles its answer a byte at a time must not hold a
health check or a key confirmation past it.
"""

from __future__ import annotations

import asyncio
import time

import httpx

KEYCHECK_PATH = "/v1/keycheck"


def client(keepalive_s: float | None = 5.0) -> httpx.AsyncClient:
    """`keepalive_s`: how long an idle connection is kept (None: as long as the engine keeps
    it; for the warm pool, whose engines wait long for the call that matters)."""
    # trust_env=False: engine traffic must never go through a proxy from the environment.
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(2.0, connect=1.0),
                             limits=httpx.Limits(max_keepalive_connections=64,
                                                 keepalive_expiry=keepalive_s))


async def _get(http: httpx.AsyncClient, url: str, timeout: float,
               headers: dict[str, str] | None = None) -> httpx.Response | None:
    """The response (body read), or None when there was none within `timeout`."""
    try:
        return await asyncio.wait_for(http.get(url, headers=headers, timeout=timeout), timeout)
    except (httpx.HTTPError, TimeoutError):
        return None


async def healthy(http: httpx.AsyncClient, url: str, timeout: float = 1.0) -> bool:
    response = await _get(http, url + "/health", timeout)
    return response is not None and response.status_code == 200


async def accepts(http: httpx.AsyncClient, url: str, key: str) -> bool | None:
    """Whether the engine accepts `key`: every route but /health needs it, so an authorised
    request to any route is anything but 401/403. None when the engine did not answer, or
    answered 5xx (a broken engine says nothing about the key)."""
    response = await _get(http, url + KEYCHECK_PATH, 1.0, {"Authorization": f"Bearer {key}"})
    if response is None or response.status_code >= 500:
        return None
    return response.status_code not in (401, 403)


async def confirm_key(http: httpx.AsyncClient, url: str, new: str, old: str | None,
                      timeout: float) -> bool:
    """Poll until the engine accepts `new` and refuses `old`, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if await accepts(http, url, new) and (old is None or await accepts(http, url, old) is False):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


IDENTITY_PATH = "/v1/identity"


async def tell_identity(http: httpx.AsyncClient, url: str, key: str, user_id: str,
                        timeout: float) -> bool:
    """Tell a warm pool's engine whose it is (app/CONTRACT.md); True once it says it knows."""
    try:
        response = await asyncio.wait_for(
            http.put(url + IDENTITY_PATH, json={"user_id": user_id}, timeout=timeout,
                     headers={"Authorization": f"Bearer {key}"}), timeout)
    except (httpx.HTTPError, TimeoutError):
        return False
    return response.status_code == 200
