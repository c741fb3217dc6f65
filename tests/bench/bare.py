"""The baseline: a bare Starlette JSON endpoint, on the same uvicorn settings as `orch serve`."""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.server import QuietServer, config
from app.config import Settings

BODY = {"admitted": True, "user_id": "bench", "url": "http://127.0.0.1:20000",
        "api_key": "eng_" + "x" * 43, "status": "running", "engine_version": "ref",
        "provisioned": False, "woken": False}


async def admit(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(BODY)


app = Starlette(routes=[Route("/engines/{user_id}/admit", admit, methods=["POST"])])

if __name__ == "__main__":
    # The same uvicorn settings as `orch serve` (app/api/server.py), the lifespan aside.
    settings = Settings()
    QuietServer(config(app, settings, "127.0.0.1", int(sys.argv[1]), lifespan="off",
                          log_level="warning")).run()
