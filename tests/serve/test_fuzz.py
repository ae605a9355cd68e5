"""Property test: no request a client can send makes the server answer 5xx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmixed.serve.app import create_app
from smartmixed.serve.settings import ServeSettings

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.lists(st.one_of(st.integers(-2, 70), st.floats(), st.text(max_size=2)), max_size=3)
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "x", ""]),
        "shape": shapes,
        "datatype": st.sampled_from(
            ["FP32", "FP64", "FP16", "INT32", "UINT8", "BYTES", "BOOL", ""]
        ),
    },
    optional={
        "data": st.lists(
            st.one_of(
                st.floats(allow_nan=False),
                st.integers(-(2**70), 2**70),
                st.text(max_size=2),
                st.lists(st.floats(allow_nan=False), max_size=3),
            ),
            max_size=140,
        ),
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "x"]), json_values, max_size=2
        ),
    },
)
infer_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=2)},
    optional={"id": json_values, "outputs": json_values, "parameters": json_values},
)
bodies = st.one_of(infer_bodies, json_values)


@pytest.fixture(scope="module")
def client(repository: Path):
    with TestClient(create_app(ServeSettings(repository=repository, max_batch_size=0))) as c:
        yield c


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    path=st.sampled_from(
        [
            "/v2/models/mixed/infer",
            "/v2/models/relu/versions/1/infer",
            "/v1/models/mixed:predict",
            "/v2/models/mixed/versions/x/infer",
        ]
    ),
    binary=st.one_of(st.none(), st.binary(max_size=300)),
)
def test_no_request_gets_a_5xx(client: TestClient, body, path: str, binary: bytes | None) -> None:
    raw = json.dumps(body).encode()  # the standard library also encodes > 64-bit integers
    headers = {"content-type": "application/json"}
    if binary is not None:
        headers["Inference-Header-Content-Length"] = str(len(raw))
        raw += binary
    response = client.post(path, content=raw, headers=headers)
    assert response.status_code < 500, response.text
    assert "error" in response.json() or response.status_code == 200
