"""`/docs`: the API reference (Swagger UI) served from the swagger-ui-py package's static
files, so it works offline; it reads /openapi.json."""

from __future__ import annotations

from pathlib import Path

import swagger_ui  # type: ignore[import-untyped]
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(swagger_ui.__file__).parent / "static"

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
