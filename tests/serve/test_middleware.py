"""serve/middleware.py as a module: the Guard in front of a tiny ASGI app, in-process.

Each request is one ASGI call; the test app records whether it was reached and answers 200
"app". Health must be answered without reaching it, the key and readiness refused with their
exact statuses and bodies.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
import pytest

from smartmixed.serve.middleware import LIVE, READY, Guard, send_json
from smartmixed.serve.settings import ServeSettings

KEY = "s3cret"
WRONG_KEY = {"error": "missing or wrong API key (send 'Authorization: Bearer KEY')"}
NOT_READY = {"error": "server is not ready"}


@dataclass
class Service:
    ready: bool = True


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    reached_app: bool

    def json(self):
        return orjson.loads(self.body)


@dataclass
class App:
    """The routes behind the guard: 200 "app", every scope it receives recorded."""

    scopes: list[dict] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"app"})


def call(
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] = (),
    key: str | None = KEY,
    ready: bool = True,
) -> Response:
    app = App()
    guard = Guard(app, settings=ServeSettings(api_key=key), service=Service(ready))
    scope = {"type": "http", "path": path, "method": method, "headers": list(headers)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return Response(start["status"], dict(start["headers"]), body["body"], bool(app.scopes))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("path", "ready", "status"),
    [(LIVE, True, 200), (LIVE, False, 200), (READY, True, 200), (READY, False, 503)],
)
def test_health_is_its_status_alone_and_never_reaches_the_app(
    path: str, ready: bool, status: int, method: str
) -> None:
    # no key sent although one is set: health stays open
    response = call(path, method=method, ready=ready)
    assert (response.status, response.headers, response.body) == (
        status,
        {b"content-length": b"0"},
        b"",
    )
    assert not response.reached_app


def test_health_paths_with_another_method_are_left_to_the_routes() -> None:
    # open like the docs (the routes answer 405), not answered by the guard as health
    response = call(READY, method="POST", ready=False)
    assert (response.status, response.body, response.reached_app) == (200, b"app", True)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"Bearer wrong")],
        [(b"x-api-key", b"wrong")],
        [(b"authorization", KEY.encode())],  # the key without "Bearer "
        [(b"authorization", b"Basic " + KEY.encode())],
        [(b"x-api-key", (KEY + "x").encode())],
        [(b"x-api-key", KEY[:-1].encode())],
    ],
)
def test_a_missing_or_wrong_key_is_refused_with_401(headers: list) -> None:
    response = call("/v2/models/relu/infer", method="POST", headers=headers, ready=False)
    assert response.status == 401 and response.json() == WRONG_KEY
    assert response.headers == {
        b"content-type": b"application/json",
        b"content-length": str(len(response.body)).encode(),
    }
    assert not response.reached_app


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer " + KEY.encode())],
        [(b"authorization", b"bEARER " + KEY.encode())],  # the scheme is case-insensitive
        [(b"x-api-key", KEY.encode())],
        # Authorization wins over X-API-Key, whichever comes first
        [(b"x-api-key", b"wrong"), (b"authorization", b"Bearer " + KEY.encode())],
        [(b"authorization", b"Bearer " + KEY.encode()), (b"x-api-key", b"wrong")],
        # the first X-API-Key counts, a second one is ignored
        [(b"x-api-key", KEY.encode()), (b"x-api-key", b"wrong")],
    ],
)
def test_the_right_key_reaches_the_app(headers: list) -> None:
    response = call("/v2/models", headers=headers)
    assert (response.status, response.body, response.reached_app) == (200, b"app", True)


def test_a_wrong_key_after_the_right_one_is_refused() -> None:
    headers = [(b"x-api-key", KEY.encode()), (b"authorization", b"Bearer wrong")]
    assert call("/v2/models", headers=headers).status == 401


@pytest.mark.parametrize(
    "path", ["/", "/metrics", "/docs", "/openapi.json", "/redoc", "/page/app.js"]
)
def test_open_paths_reach_the_app_without_a_key_even_when_not_ready(path: str) -> None:
    response = call(path, ready=False)
    assert (response.status, response.body, response.reached_app) == (200, b"app", True)


@pytest.mark.parametrize("path", ["/v2", "/v2/models/relu", "/pages", "/index.html"])
def test_other_paths_need_the_key(path: str) -> None:
    response = call(path)
    assert (response.status, response.json(), response.reached_app) == (401, WRONG_KEY, False)


def test_not_ready_is_503_after_the_key() -> None:
    auth = [(b"x-api-key", KEY.encode())]
    response = call("/v2/models/relu/infer", method="POST", headers=auth, ready=False)
    assert (response.status, response.json(), response.reached_app) == (503, NOT_READY, False)
    # without a key set, readiness is the only check
    response = call("/v2/models/relu", key=None, ready=False)
    assert (response.status, response.json()) == (503, NOT_READY)
    response = call("/v2/models/relu", key=None)
    assert (response.status, response.body, response.reached_app) == (200, b"app", True)


def test_an_empty_key_setting_means_no_key() -> None:
    assert call("/v2/models", key="  ").status == 200


def test_scopes_other_than_http_pass_through() -> None:
    app = App()
    guard = Guard(app, settings=ServeSettings(api_key=KEY), service=Service(False))
    scope = {"type": "lifespan"}
    asyncio.run(guard(scope, None, None))
    assert app.scopes == [scope]


def test_send_json_head_sends_the_headers_of_the_body_without_it() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(send_json(send, {"a": 1}, 404, {"x-extra": "yes"}, head=True))
    assert sent == [
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"7"),
                (b"x-extra", b"yes"),
            ],
        },
        {"type": "http.response.body", "body": b""},
    ]
