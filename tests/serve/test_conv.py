"""Serving models that read images: a spec with ``layers`` and a graph input [N, C, H, W].

The models are built here (tests/serve/conv_models.py: a torch module, torch's ONNX exporter,
the metadata serve reads), so these tests need neither train/ nor export/. Every answer is
compared with the torch module's own.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as triton
from conv_models import (
    CONV_ACTIVATIONS,
    HIDDEN_ACTIVATIONS,
    LAYERS,
    LOWERING,
    TinyConvNet,
    TinyMLP,
    conv_spec,
    mlp_spec,
    write_entry,
)
from fastapi.testclient import TestClient

from smartmixed.serve.app import create_app
from smartmixed.serve.batching import AdaptiveBatcher
from smartmixed.serve.codec import BINARY_HEADER
from smartmixed.serve.models import LoadError, load_repository
from smartmixed.serve.settings import ServeSettings

ATOL = 1e-5  # ONNX Runtime against torch, float32, on values of order 1


@pytest.fixture(scope="module")
def conv8() -> TinyConvNet:
    return TinyConvNet(8, seed=1).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, conv8: TinyConvNet) -> Path:
    """conv8: 1x8x8 images (a spec with layers); mlp64: rows of 64 (an MLP, as before)."""
    root = tmp_path_factory.mktemp("conv-models")
    write_entry(root, "conv8", conv8, conv_spec(8), input_dims=[1, 8, 8])
    mlp = TinyMLP(64, seed=2)
    write_entry(root, "mlp64", mlp, mlp_spec(64, input_shape=[8, 8]), input_dims=[64])
    return root


@pytest.fixture(scope="module")
def client(models: Path):
    with TestClient(create_app(ServeSettings(repository=models))) as client:
        yield client


def images(n: int, *, side: int = 8, seed: int = 0) -> np.ndarray:
    """(n, 1, side, side) raw grey levels 0..255, float32."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, side, side)).astype(np.float32)


def torch_outputs(module: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits, probabilities = module(torch.from_numpy(x))
    return {"logits": logits.numpy(), "probabilities": probabilities.numpy()}


def infer(client, model: str, shape: list, data, **tensor) -> httpx.Response:
    body = {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data, **tensor}]
    }
    return client.post(f"/v2/models/{model}/infer", json=body)


def outputs_of(answer: httpx.Response) -> dict[str, np.ndarray]:
    assert answer.status_code == 200, answer.text
    return {
        o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"])
        for o in answer.json()["outputs"]
    }


# ---- loading -------------------------------------------------------------------------------------


def test_a_layered_model_loads_with_its_image_input(models: Path) -> None:
    repo = load_repository(models, device="cpu", threads=1, skip_bad_models=False)
    conv, mlp = repo.get("conv8"), repo.get("mlp64")
    assert (conv.input_shape, conv.n_features, conv.n_classes) == ((1, 8, 8), 64, 10)
    assert (mlp.input_shape, mlp.n_features) == ((64,), 64)  # an MLP reads rows, as before
    assert conv.config.max_batch_size == 8 and conv.config.dynamic_batching


def test_metadata_and_config_show_the_input_shape(client) -> None:
    meta = client.get("/v2/models/conv8").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["shape"] for o in meta["outputs"]] == [[-1, 10], [-1, 10]]
    info = meta["smartmixed"]
    assert info["input_shape"] == [1, 8, 8] and info["layers"] == LAYERS
    assert info["architecture"] == [64, 3, 5, 10] and info["lowering"] == LOWERING
    assert info["hidden_layer_types"] == ["conv", "linear"]
    assert info["activation_mix"] == [{"relu": 2, "tanh": 1}, {"relu": 3, "tanh": 2}]
    config = client.get("/v2/models/conv8/config").json()
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    mlp = client.get("/v2/models/mlp64").json()
    assert mlp["inputs"][0]["shape"] == [-1, 64] and mlp["smartmixed"]["layers"] is None
    assert mlp["smartmixed"]["hidden_layer_types"] == ["linear"]
    assert client.get("/v2/models/mlp64/config").json()["input"][0]["dims"] == [64]


def _refusal(root: Path, name: str) -> str:
    with pytest.raises(LoadError) as refused:
        load_repository(root, device="cpu", threads=1, skip_bad_models=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{name}/1: ")
    return message


def test_a_spec_for_another_input_shape_is_refused(tmp_path: Path, conv8) -> None:
    # the 28x28 spec (arch [784, 3, 5, 10]) on the 8x8 graph
    path = write_entry(tmp_path, "bad", conv8, conv_spec(28), input_dims=[1, 8, 8])
    assert _refusal(tmp_path, "bad") == (
        f"bad/1: {path}: metadata smartmixed.spec field 'input_shape': [1, 28, 28] is not the "
        "shape of the model's input [batch, 1, 8, 8]"
    )


def test_a_spec_without_layers_on_an_image_graph(tmp_path: Path, conv8) -> None:
    """A spec without layers (an MLP's, or a user's own module's as export writes it) is served
    when the graph reads rows of arch[0] values or the spec's own input_shape."""
    flat = mlp_spec(64, input_shape=[64]) | {"arch": [64, 3, 5, 10]}
    flat["assignment"] = [CONV_ACTIVATIONS, HIDDEN_ACTIVATIONS]
    flat["pool"], flat["mode"] = ["relu", "tanh"], "smartmixed"
    path = write_entry(tmp_path / "a", "flat", conv8, flat, input_dims=[1, 8, 8])
    assert _refusal(tmp_path / "a", "flat") == (
        f"flat/1: {path}: metadata smartmixed.spec field 'input_shape': [64] is not the shape "
        "of the model's input [batch, 1, 8, 8]"
    )
    shaped = flat | {"input_shape": [1, 8, 8]}
    write_entry(tmp_path / "b", "shaped", conv8, shaped, input_dims=[1, 8, 8])
    model = load_repository(tmp_path / "b", device="cpu", threads=1, skip_bad_models=False).get(
        "shaped"
    )
    x = images(2)
    np.testing.assert_allclose(
        model.predict(x)["logits"], torch_outputs(conv8, x)["logits"], atol=ATOL
    )
    described = model.describe()
    assert (described["input_shape"], described["layers"]) == ([1, 8, 8], None)
    assert described["hidden_layer_types"] is None  # the spec does not say which are convs


@pytest.mark.parametrize(
    ("dims", "problem"),
    [
        ([1, 8, 9], "dims [1, 8, 9] do not match the ONNX model's [1, 8, 8]"),
        ([64], "dims [64] do not match the ONNX model's [1, 8, 8]"),
        ([8, 8, 1], "dims [8, 8, 1] do not match the ONNX model's [1, 8, 8]"),
    ],
)
def test_config_dims_are_checked_against_the_graph(tmp_path: Path, conv8, dims, problem) -> None:
    write_entry(tmp_path, "conv", conv8, conv_spec(8), input_dims=[1, 8, 8], config_dims=dims)
    config = tmp_path / "conv" / "config.pbtxt"
    assert _refusal(tmp_path, "conv") == (
        f"conv/1: {config}: input 'input': {problem}, without the batch dimension "
        "(max_batch_size 8)"
    )


# ---- V2 infer --------------------------------------------------------------------------------------


def test_infer_answers_as_torch_does(client, conv8) -> None:
    x = images(3)
    expected = torch_outputs(conv8, x)
    flat = infer(client, "conv8", [3, 1, 8, 8], x.ravel().tolist())
    nested = infer(client, "conv8", [3, 1, 8, 8], x.tolist())
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    )
    binary = client.post(
        "/v2/models/conv8/infer",
        content=header + x.astype("<f4").tobytes(),
        headers={"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))},
    )
    # pixels as JSON integers are FP32 values; declared as another datatype they are refused
    ints = infer(client, "conv8", [3, 1, 8, 8], x.astype(int).ravel().tolist())
    uint8 = infer(client, "conv8", [3, 1, 8, 8], x.astype(int).ravel().tolist(), datatype="UINT8")
    assert (uint8.status_code, uint8.json()) == (
        400,
        {"error": "inference input 'input' data-type is 'UINT8', but model 'conv8' expects 'FP32'"},
    )
    for answer in (flat, nested, binary, ints):
        got = outputs_of(answer)
        for name in ("logits", "probabilities"):
            assert got[name].shape == (3, 10)
            np.testing.assert_allclose(got[name], expected[name], atol=ATOL, rtol=0)


X3 = images(3).tolist()  # [3][1][8][8]


def edited(index: tuple[int, ...], value) -> list:
    """X3 (a copy) with the item at ``index`` replaced by ``value``."""
    data = images(3).tolist()
    owner = data
    for i in index[:-1]:
        owner = owner[i]
    owner[index[-1]] = value
    return data


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        (
            [3, 64],
            images(3).ravel().tolist(),
            "input shape [3, 64]: model 'conv8' expects [N, 1, 8, 8]",
        ),
        ([3, 1, 8], X3, "input shape [3, 1, 8]: model 'conv8' expects [N, 1, 8, 8]"),
        ([3, 8, 8, 1], X3, "input shape [3, 8, 8, 1]: model 'conv8' expects [N, 1, 8, 8]"),
        ([3, 1, 8, 9], X3, "input shape [3, 1, 8, 9]: model 'conv8' expects [N, 1, 8, 8]"),
        ([0, 1, 8, 8], [], "input shape [0, 1, 8, 8]: empty batch: the input has no rows"),
        (
            [9, 1, 8, 8],
            [],
            "input shape [9, 1, 8, 8]: batch of 9 rows is over the limit of 8",  # config.pbtxt
        ),
        (
            [3, 1, 8, 8],
            [0.0] * 191,
            "input 'data' holds 191 values; shape [3, 1, 8, 8] needs 192",
        ),
        (
            [3, 1, 8, 8],
            images(3).reshape(3, 64).tolist(),
            "input 'data'[0] holds 64 items; shape [3, 1, 8, 8] needs 1 there",
        ),
        (
            [3, 1, 8, 8],
            X3[:2],
            "input 'data' holds 2 rows; shape [3, 1, 8, 8] needs 3 lists nested as [1][8][8]",
        ),
        (
            [3, 1, 8, 8],
            edited((2, 0), X3[2][0][:7]),
            "input 'data'[2][0] holds 7 items; shape [3, 1, 8, 8] needs 8 there",
        ),
        (
            [3, 1, 8, 8],
            edited((2, 0, 5), 5.0),
            "input 'data'[2][0][5] is a float, not a list of 8; send 192 numbers or lists "
            "nested as [3][1][8][8]",
        ),
        (
            [3, 1, 8, 8],
            [X3[0], 7, X3[2]],
            "input 'data' mixes lists and values: [0] is a list, [1] is an integer; send 192 "
            "numbers or lists nested as [3][1][8][8]",
        ),
        (
            [3, 1, 8, 8],
            edited((2, 0, 2, 3), "x"),
            "input 'data' must hold numbers only (ints or floats for FP32): input "
            "'data'[2][0][2][3] is a string ('x')",
        ),
        (
            [3, 1, 8, 8],
            edited((1, 0, 1, 6), 1e39),
            "input holds NaN or infinite values: input 'data'[1][0][1][6] = 1e+39 overflows FP32",
        ),
    ],
)
def test_infer_refuses_shapes_and_nestings_not_the_models(client, shape, data, message) -> None:
    answer = infer(client, "conv8", shape, data)
    assert (answer.status_code, answer.json()) == (400, {"error": message})


def test_binary_data_of_an_image_model(client) -> None:
    x = images(2)
    x[1, 0, 3, 4] = np.inf
    blob = x.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    )
    headers = {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}
    answer = client.post("/v2/models/conv8/infer", content=header + blob, headers=headers)
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "input holds NaN or infinite values: binary input[1][0][3][4] = inf"},
    )
    short = header.replace(str(len(blob)).encode(), b"508")
    headers[BINARY_HEADER] = str(len(short))
    answer = client.post("/v2/models/conv8/infer", content=short + blob[:508], headers=headers)
    assert answer.json() == {
        "error": "binary_data_size 508 does not match the input: shape [2, 1, 8, 8] of FP32 "
        "needs 512 bytes"
    }


def test_an_mlp_keeps_its_rows(client) -> None:
    rows = images(2).reshape(2, 64)
    assert outputs_of(infer(client, "mlp64", [2, 64], rows.tolist()))["logits"].shape == (2, 10)
    answer = infer(client, "mlp64", [2, 1, 8, 8], rows.ravel().tolist())
    assert answer.json() == {"error": "input shape [2, 1, 8, 8]: expected [N, 64], two integers"}


def test_batched_answers_equal_unbatched_row_by_row(models: Path) -> None:
    """The batcher concatenates (n, 1, 8, 8) requests along the batch and splits them back."""
    model = load_repository(models, device="cpu", threads=1, skip_bad_models=False).get("conv8")
    rng = np.random.default_rng(3)
    requests = [images(int(rng.integers(1, 4)), seed=i) for i in range(40)]
    batches: list[int] = []

    async def main() -> list[dict[str, np.ndarray]]:
        with ThreadPoolExecutor(2) as pool:
            batcher = AdaptiveBatcher(
                model.predict,
                max_batch_size=8,
                max_delay=0.005,
                executor=pool,
                observe=lambda rows, waits, seconds: batches.append(rows),
            )
            results = await asyncio.gather(*(batcher.predict(x) for x in requests))
            await batcher.close()
            return results

    for x, result in zip(requests, asyncio.run(main()), strict=True):
        alone = model.predict(x)
        for name in ("logits", "probabilities"):
            assert result[name].shape == (len(x), 10)
            np.testing.assert_allclose(result[name], alone[name], rtol=1e-5, atol=1e-6)
    assert sum(batches) == sum(len(x) for x in requests)
    assert len(batches) < len(requests) and max(batches) <= 8  # merged, within the limit


# ---- /v1 predict ----------------------------------------------------------------------------------


def test_predict_takes_nested_and_flat_instances(client, conv8) -> None:
    x = images(2)
    expected = torch_outputs(conv8, x)["probabilities"]
    nested = client.post("/v1/models/conv8:predict", json={"instances": x.tolist()})
    flat = client.post("/v1/models/conv8:predict", json={"instances": x.reshape(2, 64).tolist()})
    for answer in (nested, flat):
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        np.testing.assert_allclose(
            [p["probabilities"] for p in predictions], expected, atol=ATOL, rtol=0
        )
        assert [p["label"] for p in predictions] == [str(k) for k in expected.argmax(1)]


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        (
            [X3[0][0]],  # [8][8]
            "instances[0] is nested as [8][8]; model 'conv8' takes an instance as 64 numbers or "
            "nested as [1][8][8]",
        ),
        (
            [[0.0] * 63],
            "instances[0] holds 63 values; model 'conv8' takes an instance as 64 numbers or "
            "nested as [1][8][8]",
        ),
        (
            [X3[0], [0.0] * 64],
            "instances[0] is nested and instances[1] flat; send every instance the same way, "
            "as 64 numbers or nested as [1][8][8]",
        ),
        (
            edited((1, 0, 1), X3[1][0][1][:7])[:2],
            "instances[1][0][1] holds 7 items; shape [2, 1, 8, 8] needs 8 there",
        ),
        (
            [[0.0] * 63 + [True]],
            "instances must hold numbers only (ints or floats for FP32): instances[0][63] is a "
            "boolean (true)",
        ),
    ],
)
def test_predict_refuses_other_instances(client, instances, message) -> None:
    answer = client.post("/v1/models/conv8:predict", json={"instances": instances})
    assert (answer.status_code, answer.json()) == (400, {"error": message})


# ---- a real server process ------------------------------------------------------------------------


def test_tritonclient_sends_images_to_a_real_server(models: Path, server_starter, conv8) -> None:
    server = server_starter(models, "--log-level", "warning")
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_model_metadata("conv8")["inputs"][0]["shape"] == [-1, 1, 8, 8]
        x = images(4, seed=5)
        expected = torch_outputs(conv8, x)
        for binary in (True, False):
            tensor = triton.InferInput("input", [4, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = [triton.InferRequestedOutput(n, binary_data=binary) for n in expected]
            result = client.infer("conv8", [tensor], outputs=wanted)
            for name, values in expected.items():
                np.testing.assert_allclose(result.as_numpy(name), values, atol=ATOL, rtol=0)
        with pytest.raises(triton.InferenceServerException) as refused:
            wrong = triton.InferInput("input", [4, 64], "FP32")
            wrong.set_data_from_numpy(x.reshape(4, 64))
            client.infer("conv8", [wrong])
        assert "input shape [4, 64]: model 'conv8' expects [N, 1, 8, 8]" in str(refused.value)
        client.close()
    finally:
        server.proc.kill()
        server.proc.wait()


# ---- the page ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory, server_starter, conv8):
    """conv28 (1x28x28 images) and mlp784 (rows of 784) take the drawing; conv8 (1x8x8) not."""
    root = tmp_path_factory.mktemp("conv-page")
    modules = {"conv28": TinyConvNet(28, seed=3), "mlp784": TinyMLP(784, seed=4), "conv8": conv8}
    write_entry(root, "conv28", modules["conv28"], conv_spec(28), input_dims=[1, 28, 28])
    mlp = mlp_spec(784, input_shape=[28, 28])
    write_entry(root, "mlp784", modules["mlp784"], mlp, input_dims=[784])
    write_entry(root, "conv8", conv8, conv_spec(8), input_dims=[1, 8, 8])
    server = server_starter(root, "--log-level", "warning")
    yield server, modules
    server.proc.kill()
    server.proc.wait()


def direct_probabilities(url: str, model: str, shape: list[int], row: list[float]) -> np.ndarray:
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": row}]}
    answer = httpx.post(f"{url}/v2/models/{model}/infer", json=body)
    return outputs_of(answer)["probabilities"][0]


@pytest.mark.slow  # chromium and three models: .ci/run (the page's own tests draw in make test)
def test_the_page_sends_each_model_its_own_shape(browser, page_server) -> None:
    from test_page import ONE, _wait, console_errors, css, draw, open_page, results

    server, modules = page_server
    open_page(browser, server.url)
    _wait(browser, lambda d: len(css(d, ".result[data-model]")) == 3, "the result boxes")
    drawing = css(browser, '.panel[data-features="784"]')[0]
    drawn = [
        b.get_attribute("data-model") for b in drawing.find_elements("css selector", "[data-model]")
    ]
    assert sorted(drawn) == ["conv28", "mlp784"]  # conv8 reads 1x8x8: not offered the drawing

    draw(browser, ONE, "mouse")
    shown = results(browser, ["conv28", "mlp784"])
    pixels = json.loads(css(browser, "canvas#draw")[0].get_attribute("data-pixels"))
    image = np.array(pixels, dtype=np.float32).reshape(1, 1, 28, 28)
    for model, shape in (("conv28", [1, 1, 28, 28]), ("mlp784", [1, 784])):
        direct = direct_probabilities(server.url, model, shape, pixels)
        x = image if model == "conv28" else image.reshape(1, 784)
        own = torch_outputs(modules[model], x)["probabilities"][0]
        np.testing.assert_allclose(shown[model]["probabilities"], direct, atol=1e-6, rtol=0)
        np.testing.assert_allclose(direct, own, atol=ATOL, rtol=0)
        assert shown[model]["label"] == str(int(direct.argmax()))

    # conv8: its card says why there is no drawing; its own form sends [1, 1, 8, 8]
    card = css(browser, '[data-card="conv8"]')[0]
    assert card.find_element("css selector", ".no-drawing").text.startswith(
        "Not offered the drawing: this model reads 1x8x8 images, the drawing gives 1x28x28 pixels."
    )
    assert not css(browser, '[data-card="conv28"] .no-drawing')
    form = css(browser, 'form[data-shape="1x8x8"]')[0]
    assert len(form.find_elements("css selector", "input[type=number]")) == 64
    form.find_element("css selector", "button.example").click()
    assert 'example: a drawn "0" (8x8, raw values 0 to 255)' in form.text
    form.find_element("css selector", "button[type=submit]").click()
    shown = results(browser, ["conv8"])
    row = json.loads(form.get_attribute("data-features"))
    direct = direct_probabilities(server.url, "conv8", [1, 1, 8, 8], row)
    np.testing.assert_allclose(shown["conv8"]["probabilities"], direct, atol=1e-6, rtol=0)

    # the conv model's card: input, layers, the mix labelled conv / linear
    card = css(browser, '[data-card="conv28"]')[0]
    assert "1x28x28 image (channels, height, width)" in card.text
    layers = card.find_element("css selector", ".layers")
    assert layers.text == "conv 3 k3 → maxpool 2 → flatten → linear 5 → linear 10"
    kinds = [s.get_attribute("data-layer") for s in layers.find_elements("css selector", "span")]
    assert kinds == ["conv", "maxpool", "flatten", "linear", "linear"]
    bars = card.find_elements("css selector", ".mix .layer")
    assert [b.get_attribute("data-layer-type") for b in bars] == ["conv", "linear"]
    assert [b.find_element("css selector", ".name").text for b in bars] == ["conv 1", "linear 2"]
    parts = bars[0].find_elements("css selector", ".part")
    assert {p.get_attribute("title") for p in parts} == {
        "conv 1: relu 2 of 3 channels (66.7%)",
        "conv 1: tanh 1 of 3 channels (33.3%)",
    }
    assert "784 features" in css(browser, '[data-card="mlp784"]')[0].text
    assert not css(browser, '[data-card="mlp784"] .layers')
    assert console_errors(browser) == []
