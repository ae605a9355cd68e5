"""Plain ASGI middleware in front of the routes: health, API key, readiness.

The page for people (page.py: ``/`` and its files under ``/page/``) is open like the docs: it
holds no model data, asks for the key itself when the API answers 401, and says so when the
server is not ready.

(Starlette's @app.middleware("http") wraps every request in task groups and memory streams; on
this hot path that halved the requests/s the service could take. See docs/results.md for the HTTP figures.)
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from smartmixed.serve.settings import ServeSettings

LIVE, READY = "/v2/health/live", "/v2/health/ready"
OPEN_PATHS = (LIVE, READY, "/metrics", "/docs", "/openapi.json", "/redoc", "/page/")
PAGE = "/"  # exactly "/": a prefix would open every path


async def send_json(
    send,
    content: Any,
    status: int,
    headers: dict[str, str] | None = None,
    *,
    head: bool = False,
) -> None:
    """``content`` as a JSON response; ``head``: the headers only (the answer to HEAD)."""
    body = orjson.dumps(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_status(send, status: int) -> None:
    """A response that is its status alone: no body (Content-Length 0), as health answers."""
    headers = [(b"content-length", b"0")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


class Guard:
    """Health answered first, from the event loop, with no routing and no model work (an
    orchestrator must never see a healthy server as dead because inference is busy): the status
    alone, 200 or 503 while not ready, an empty body (the protocol's health API); then the API
    key; then readiness."""

    def __init__(self, app, *, settings: ServeSettings, service) -> None:
        self.app, self.service = app, service  # service: app.Service (its ``ready`` flag)
        key = settings.api_key
        self.key = None if key is None else key.get_secret_value().encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in (LIVE, READY) and method in ("GET", "HEAD"):
            return await send_status(send, 200 if path == LIVE or self.service.ready else 503)
        if path == PAGE or path.startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        if self.key is not None and not secrets.compare_digest(self._given_key(scope), self.key):
            return await send_json(
                send, {"error": "missing or wrong API key (send 'Authorization: Bearer KEY')"}, 401
            )
        if not self.service.ready:
            return await send_json(send, {"error": "server is not ready"}, 503)
        return await self.app(scope, receive, send)

    @staticmethod
    def _given_key(scope) -> bytes:
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key" and not given:
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:]
        return given
