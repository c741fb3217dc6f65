"""`/docs`: the API reference (Swagger UI) served from the swagger-ui-py package's static
files, so it works offline; it reads /openapi.json."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles


def _static_dir() -> Path:
    # Found, not imported: importing swagger_ui loads jinja2 and costs start-up ~80 ms.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


STATIC = _static_dir()

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Engine orchestrator API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui",
                                 deepLinking: true, tryItOutEnabled: false});
  </script>
</body>
</html>
"""


async def page(_request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


def routes() -> list[BaseRoute]:
    return [Route("/docs", page, methods=["GET"]),
            Mount("/docs/static", StaticFiles(directory=STATIC), name="docs-static")]
