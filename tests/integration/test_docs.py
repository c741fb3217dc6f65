"""/docs renders the API reference in a real browser (headless Chromium), from files this
package serves itself: no request leaves the machine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from app.api.spec import ENDPOINTS
from tests.harness import Orchestrator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_docs_page_and_assets_are_served_locally(orch: Orchestrator) -> None:
    page = httpx.get(orch.url + "/docs", trust_env=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/static/") for s in sources), sources
    for source in sources:
        assert httpx.get(orch.url + source, trust_env=False).status_code == 200, source


@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_docs_render_every_operation_in_chromium(orch: Orchestrator, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=15000", "--dump-dom", orch.url + "/docs"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    dom = result.stdout
    assert "opblock" in dom, f"Swagger UI did not render: {result.stderr[-2000:]}"
    shown = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {e.path for e in ENDPOINTS} <= shown, shown
    for endpoint in ENDPOINTS:
        assert endpoint.summary in dom.replace("&#x27;", "'").replace("&amp;", "&"), endpoint.summary
