"""GET /: the page for people (model cards, draw-a-digit, side-by-side answers).

Plain files in ``serve/static/`` (no build step, no framework, nothing from the internet), served
by the app itself: ``/`` is ``index.html``, ``/page/NAME`` the other files. The page talks to the
V2 API like any client (serve/routes.py), sending the API key the user typed; it and its files
are open (middleware.py), since they hold no model data.

Caching: every response carries ``ETag`` and ``Last-Modified`` (starlette's file responses) and
``Cache-Control: no-cache``: browsers keep the files but ask again each time, a 304 when nothing
changed, so a new version of the package is never hidden behind a stale script (the file names
carry no content hash, there being no build step).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
INDEX, FILES_PREFIX = "/", "/page"  # middleware.py lets exactly these through, key or not
CACHE_CONTROL = "no-cache"
# The page loads only its own files and talks only to this server (tested: the browser tests
# fail on any console error, and a blocked load is one).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class PageFiles(StaticFiles):
    """starlette's StaticFiles (content types, ETag, Last-Modified, 304) plus this page's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code in (200, 304):
            response.headers["Cache-Control"] = CACHE_CONTROL
            response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def add_page(app: FastAPI) -> None:
    """Serve ``index.html`` at ``/`` and the page's other files under ``/page/``."""
    files = PageFiles(directory=STATIC_DIR)
    router = APIRouter()

    @router.api_route(INDEX, methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        return await files.get_response("index.html", request.scope)

    app.include_router(router)
    app.mount(FILES_PREFIX, files, name="page")
