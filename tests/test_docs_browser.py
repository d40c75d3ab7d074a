"""/docs as a person sees it: Swagger UI rendered by headless Chromium from Debian.

The API is served on 127.0.0.1 by werkzeug in a thread; Chromium runs the page's JavaScript
(``--virtual-time-budget``) and dumps the DOM it built.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from importlib import metadata

import pytest
from werkzeug.serving import make_server

from app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")


def rendered_docs(settings, redis_url, tmp_path, **overrides) -> str:
    """The DOM of /docs after Swagger UI rendered it."""
    app = create_app(
        settings.replace(dashboard={"enabled": False}, **overrides), redis_url=redis_url
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_port}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    finally:
        server.shutdown()
        thread.join(5)
    assert 'data-path="/gpu/allocate"' in out.stdout, "Swagger UI did not render the spec"
    return out.stdout


def test_docs_page_has_no_authorize_button_with_auth_off(settings, redis_url, tmp_path):
    dom = rendered_docs(settings, redis_url, tmp_path)
    assert "btn authorize" not in dom
    assert f"> {metadata.version('gpu-orchestrator')} </pre>" in dom  # info.version
    assert "PaginationMetadata" not in dom


def test_docs_page_offers_authorize_with_auth_on(settings, redis_url, tmp_path):
    dom = rendered_docs(
        settings,
        redis_url,
        tmp_path,
        auth={
            "enabled": True,
            "api_keys": {"k" * 20: "alice"},
            "public_paths": ["/docs*", "/openapi.json"],
        },
    )
    assert "btn authorize" in dom
