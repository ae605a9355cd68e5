"""GET /, the page for people, in a real browser: headless Debian chromium through chromedriver
(``make system-deps``; without them these tests skip saying so) against real smartmixed-serve
processes on 127.0.0.1.

One browser and two servers (open, and with an API key) for the whole module. Every browser test
ends by checking the browser's console: no SEVERE entry, except the network line of a status the
test asked for (Chrome logs every 4xx answer to a fetch, e.g. the 401 that makes the page ask
for a key).

``make demo-screenshot`` runs ``test_demo_screenshot`` alone, which writes docs/demo.png.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

API_KEY = "page-test-key"
ACTIVATION_RGB = {"relu": "rgba(31, 119, 180, 1)"}  # cards.js, fixed
WAIT_S = 15
CANVAS = 280  # canvas#draw's size in CSS pixels

# strokes in canvas pixels: a "1" (a vertical line) and a "0" (an elliptic ring)
ONE = [(140, 40 + 10 * i) for i in range(21)]
ZERO = [
    (140 + 60 * math.sin(2 * math.pi * i / 36), 140 - 90 * math.cos(2 * math.pi * i / 36))
    for i in range(37)
]
SEVEN = [(70, 60), (140, 60), (210, 60), (180, 120), (150, 180), (125, 240)]


def _stop(server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def server(page_repository: Path, server_starter) -> Iterator:
    started = server_starter(page_repository, "--skip-bad-models", "--log-level", "warning")
    yield started
    _stop(started)


@pytest.fixture(scope="module")
def key_server(page_repository: Path, server_starter) -> Iterator:
    started = server_starter(
        page_repository,
        "--skip-bad-models",
        "--log-level",
        "warning",
        env={"SMARTMIXED_API_KEY": API_KEY},
    )
    yield started
    _stop(started)


# ---- driving the page ----------------------------------------------------------------------------


def _wait(browser, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(condition)
    except TimeoutException:
        body = browser.find_element("tag name", "body").text
        pytest.fail(f"timed out waiting for {what}; the page shows:\n{body}")


def open_page(browser, url: str) -> None:
    browser.get("about:blank")
    browser.get_log("browser")  # drop what earlier tests left
    browser.delete_all_cookies()
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()


def console_errors(browser, *expected_statuses: int) -> list[dict]:
    """The console's SEVERE entries, less network lines for the statuses a test asked for."""
    expected = tuple(f"status of {s} " for s in expected_statuses)
    return [
        e
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE"
        and not (e.get("source") == "network" and any(s in e["message"] for s in expected))
    ]


def css(browser, selector: str):
    return browser.find_elements("css selector", selector)


def results(browser, names: list[str]) -> dict[str, dict]:
    """{model: {"label", "probabilities"}} once every model shows a prediction."""

    def shown(driver):
        boxes = {n: driver.find_element("css selector", f'[data-model="{n}"]') for n in names}
        if all(b.get_attribute("data-label") is not None for b in boxes.values()):
            return {
                n: {
                    "label": b.get_attribute("data-label"),
                    "probabilities": json.loads(b.get_attribute("data-probabilities")),
                }
                for n, b in boxes.items()
            }
        return False

    return _wait(browser, shown, f"predictions of {', '.join(names)}")


def draw(browser, points: list[tuple[float, float]], pointer: str = "mouse") -> None:
    """One stroke through ``points`` (canvas pixels) with a mouse, a finger or a pen: real
    pointer events from the browser (WebDriver actions), not events made up in JavaScript."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    kind = {
        "mouse": interaction.POINTER_MOUSE,
        "touch": interaction.POINTER_TOUCH,
        "pen": interaction.POINTER_PEN,
    }[pointer]
    canvas = browser.find_element("css selector", "canvas#draw")
    actions = ActionBuilder(browser, mouse=PointerInput(kind, pointer), duration=10)
    stroke = actions.pointer_action
    # offsets from the element's centre (WebDriver's rule)
    stroke.move_to(canvas, round(points[0][0] - CANVAS / 2), round(points[0][1] - CANVAS / 2))
    stroke.pointer_down()
    for x, y in points[1:]:
        stroke.move_to(canvas, round(x - CANVAS / 2), round(y - CANVAS / 2))
    stroke.pointer_up()
    actions.perform()


def v2_probabilities(server, model: str, row: list[float], key: str | None = None):
    """The server's own probabilities for one row: a direct V2 call, no browser."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}],
        "outputs": [{"name": "probabilities"}],
    }
    answer = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["outputs"][0]["data"])


def assert_same_as_direct_call(server, shown: dict[str, dict], row, key: str | None = None):
    for model, result in shown.items():
        direct = v2_probabilities(server, model, row, key)
        labels = httpx.get(
            f"{server.url}/v2/models/{model}",
            headers={"Authorization": f"Bearer {key}"} if key else {},
        ).json()["smartmixed"]["labels"]
        # the page's softmax of the logits (float64 in JS) against the graph's float32 softmax
        np.testing.assert_allclose(result["probabilities"], direct, atol=1e-6, rtol=0)
        assert result["label"] == labels[int(direct.argmax())]


def drawn_pixels(browser) -> list[int]:
    pixels = json.loads(css(browser, "canvas#draw")[0].get_attribute("data-pixels"))
    image = np.array(pixels, dtype=float).reshape(28, 28)
    # MNIST's recipe: integer grey levels 0-255, the digit's longer side 20 pixels, its centre of
    # mass within half a pixel of the field's centre (integer shifts)
    assert len(pixels) == 784 and all(isinstance(p, int) and 0 <= p <= 255 for p in pixels)
    assert image.max() == 255
    rows, cols = np.nonzero(image)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 == 20
    ys, xs = np.indices(image.shape) + 0.5
    centre = (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()
    assert np.allclose(centre, 14, atol=0.5 + 1e-9), centre
    return pixels


# ---- the tests ------------------------------------------------------------------------------------


@pytest.mark.slow  # chromium: about 20 s for the four; .ci/run runs them after make test
def test_draw_a_one_and_a_zero(browser, server):
    open_page(browser, server.url)
    mnist = ["mnist-mixed", "mnist-relu"]
    _wait(browser, lambda d: len(css(d, ".result[data-model]")) == 3, "the result boxes")
    assert css(browser, "canvas#draw")[0].value_of_css_property("touch-action") == "none"

    draw(browser, ONE, "mouse")
    shown = results(browser, mnist)
    pixels = drawn_pixels(browser)
    rows, cols = np.nonzero(np.array(pixels).reshape(28, 28))
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 4  # tall, thin
    assert_same_as_direct_call(server, shown, pixels)
    for model in mnist:  # top-3 bars and a round-trip time, side by side
        box = css(browser, f'[data-model="{model}"]')[0]
        assert len(box.find_elements("css selector", ".top li")) == 3
        assert "round trip" in box.find_element("css selector", ".rtt").text

    css(browser, "#clear")[0].click()
    assert all(
        b.get_attribute("data-label") is None for b in css(browser, ".result[data-model^=mnist]")
    )
    assert css(browser, "canvas#draw")[0].get_attribute("data-pixels") is None
    draw(browser, ZERO, "touch")
    shown = results(browser, mnist)
    pixels = drawn_pixels(browser)
    image = np.array(pixels).reshape(28, 28)
    assert image[14, 14] == 0 and image[14].max() > 200  # a ring: ink around, none inside
    assert_same_as_direct_call(server, shown, pixels)
    assert console_errors(browser) == []


@pytest.mark.slow  # chromium: about 20 s for the four; .ci/run runs them after make test
def test_model_cards(browser, server):
    open_page(browser, server.url)
    _wait(browser, lambda d: len(css(d, "[data-card]")) == 4, "four model cards")
    meta = httpx.get(f"{server.url}/v2/models/mnist-mixed").json()["smartmixed"]
    card = css(browser, '[data-card="mnist-mixed"]')[0]
    text = card.text
    assert "784 → 32 → 10" in text and "smartmixed" in text and "ready" in text
    assert "passed against PyTorch" in text
    assert f"{100 * meta['test_metrics']['test_accuracy']:.1f}%" in text
    assert meta["latency"] is not None and "1 row: " in text  # --lowering auto timed it
    assert f"{meta['lowering']} (fp32)" in text
    # one stacked bar per hidden layer, one part per activation, widths its share of neurons
    parts = card.find_elements("css selector", ".mix .part")
    counts = meta["activation_mix"][0]
    assert sorted(p.get_attribute("data-activation") for p in parts) == sorted(counts)
    for part in parts:
        share = counts[part.get_attribute("data-activation")] / sum(counts.values())
        width = browser.execute_script("return arguments[0].style.width", part)
        assert width == f"{100 * share:g}%" or abs(float(width[:-1]) - 100 * share) < 1e-9
    relu_card = css(browser, '[data-card="mnist-relu"]')[0]
    (relu,) = relu_card.find_elements("css selector", ".mix .part")
    assert relu.value_of_css_property("background-color") == ACTIVATION_RGB["relu"]
    assert "not measured" in relu_card.text  # --lowering permuted: nothing timed
    legend = {e.text: e for e in css(browser, "#legend [data-activation]")}
    assert set(legend) == set(counts) | {"relu"}
    swatch = legend["relu"].find_element("css selector", ".swatch")
    assert swatch.value_of_css_property("background-color") == ACTIVATION_RGB["relu"]
    # the entry that did not load: its card says so, with the reason
    broken = css(browser, '[data-card="broken"]')[0]
    assert "not ready" in broken.text and "failed to load" in broken.text
    assert "broken/1: cannot read" in broken.text and "not an ONNX model" in broken.text
    assert not css(browser, '[data-model="broken"]')  # nothing to send it
    assert console_errors(browser) == []


@pytest.mark.slow  # chromium: about 20 s for the four; .ci/run runs them after make test
def test_form_for_a_64_feature_model(browser, server):
    open_page(browser, server.url)
    _wait(browser, lambda d: css(d, 'form[data-width="64"] button.example'), "the form")
    form = css(browser, 'form[data-width="64"]')[0]
    assert len(form.find_elements("css selector", "input[type=number]")) == 64
    form.find_element("css selector", "button.example").click()
    assert 'example: a drawn "0"' in form.text
    form.find_element("css selector", "button[type=submit]").click()
    shown = results(browser, ["digits-relu"])
    row = json.loads(form.get_attribute("data-features"))
    assert len(row) == 64 and max(row) == 16 and min(row) == 0  # digits' raw range, 0-16
    assert_same_as_direct_call(server, shown, row)
    # a value the server refuses (NaN is not JSON; a huge number is not a float32): the 4xx
    # answer is shown in the model's box
    field = form.find_element("css selector", "input[name=f0]")
    field.clear()
    field.send_keys("1e39")
    form.find_element("css selector", "button[type=submit]").click()
    box = _wait(
        browser,
        lambda d: (d.find_elements("css selector", '[data-model="digits-relu"].failed') or [False])[
            0
        ],
        "the refusal",
    )
    assert "refused the request (400)" in box.text
    assert console_errors(browser, 400) == []


@pytest.mark.slow  # chromium: about 20 s for the four; .ci/run runs them after make test
def test_api_key(browser, key_server):
    open_page(browser, key_server.url)
    form = _wait(browser, lambda d: css(d, "#key-form:not([hidden])"), "the key prompt")[0]
    assert "needs an API key (401)" in form.text
    form.find_element("css selector", "#key").send_keys("wrong")
    form.find_element("css selector", "button").click()
    _wait(browser, lambda d: "refused the API key (401)" in form.text, "the 401 message")
    assert not css(browser, "[data-card]:not(.not-ready)")
    form.find_element("css selector", "#key").send_keys(API_KEY)
    form.find_element("css selector", "button").click()
    _wait(browser, lambda d: css(d, "canvas#draw"), "the drawing once the key is accepted")
    assert css(browser, "#key-form")[0].get_attribute("hidden") is not None
    draw(browser, ONE, "pen")
    shown = results(browser, ["mnist-mixed", "mnist-relu"])
    assert_same_as_direct_call(key_server, shown, drawn_pixels(browser), key=API_KEY)
    assert console_errors(browser, 401) == []


def test_page_files_and_api(key_server):
    """No browser: what the page's files are served with, what stays closed, the API additions."""
    url = key_server.url
    page = httpx.get(url + "/")  # open without the key: the page asks for it itself
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'src="/page/app.js"' in page.text and "http" not in page.text.split("<body>")[0]
    for name, kind in (
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("preprocess.js", "text/javascript"),
    ):
        answer = httpx.get(f"{url}/page/{name}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert answer.headers["cache-control"] == "no-cache" and answer.headers["last-modified"]
        again = httpx.get(f"{url}/page/{name}", headers={"If-None-Match": answer.headers["etag"]})
        assert again.status_code == 304
    missing = httpx.get(f"{url}/page/nothing.js")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    # /page/ opens only its own files: a way out of the folder is not a way past the key
    # (a raw request: HTTP clients remove the dot segments themselves)
    with socket.create_connection(("127.0.0.1", key_server.port), timeout=10) as sock:
        sock.sendall(b"GET /page/../v2/models/mnist-relu HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
    assert httpx.get(f"{url}/v2/models/mnist-relu").status_code == 401
    # the model list (Triton's repository index) is behind the key like the rest of the API
    assert httpx.post(f"{url}/v2/repository/index").status_code == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}
    index = httpx.post(f"{url}/v2/repository/index", headers=auth).json()
    assert [(m["name"], m["state"]) for m in index] == [
        ("broken", "UNAVAILABLE"),
        ("digits-relu", "READY"),
        ("mnist-mixed", "READY"),
        ("mnist-relu", "READY"),
    ]
    assert index[0]["reason"].startswith("broken/1: ")
    ready_only = httpx.post(f"{url}/v2/repository/index", headers=auth, json={"ready": True})
    assert [m["name"] for m in ready_only.json()] == ["digits-relu", "mnist-mixed", "mnist-relu"]
    bad = httpx.post(f"{url}/v2/repository/index", headers=auth, json={"ready": "yes"})
    assert bad.status_code == 400 and "ready" in bad.json()["error"]


def test_demo_screenshot(browser, server_starter, request):
    """``make demo-screenshot``: the page serving the `make run` repository (models/, else this
    module's), a digit drawn, saved as PNG. Runs only when SMARTMIXED_DEMO_SCREENSHOT names the
    file."""
    out = os.environ.get("SMARTMIXED_DEMO_SCREENSHOT")
    if not out:
        pytest.skip("writes docs/demo.png only under `make demo-screenshot`")
    repository = Path(os.environ.get("SMARTMIXED_DEMO_REPOSITORY", "models"))
    if not repository.is_dir():
        repository = request.getfixturevalue("page_repository")
    demo = server_starter(repository, "--skip-bad-models", "--log-level", "warning")
    try:
        open_page(browser, demo.url)
        _wait(browser, lambda d: css(d, "canvas#draw"), "the drawing")
        draw(browser, SEVEN, "mouse")
        drawn = css(browser, '.panel[data-features="784"] [data-model]')
        names = [b.get_attribute("data-model") for b in drawn]
        results(browser, names)
        # the whole page in one picture: a viewport as tall as the page (Chrome DevTools)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        try:
            assert browser.save_screenshot(str(Path(out).resolve()))
        finally:
            browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        assert console_errors(browser) == []
    finally:
        _stop(demo)
