"""A real ``smartmixed-serve`` process on 127.0.0.1 (one fixture for every process test)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the server wrote (stops it first if it still runs)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)[0]


def start_server(
    repository: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> ServerProcess:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartmixed.serve",
            "--repository",
            str(repository),
            "--port",
            str(port),
            *args,
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(proc, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"server did not become ready: {server.output()}")


@pytest.fixture(scope="session")
def server_starter():
    """``start_server`` itself, for module-scoped fixtures (the caller stops what it starts)."""
    return start_server


@pytest.fixture
def serve_process(repository: Path) -> Iterator:
    """``serve_process(*flags, env={...})`` starts a server; every one started is killed after."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        started.append(start_server(repository, *args, env=env))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# ---- the page (tests/serve/test_page.py): an MNIST-shaped repository and a real browser -------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def page_repository(tmp_path_factory: pytest.TempPathFactory, repository: Path) -> Path:
    """Models for the page: two on 28x28 images (mixed, fixed ReLU: tiny, seconds of training on
    the embedded MNIST), the fixed one of ``repository`` on sklearn's 8x8 digits (64 features:
    the form) as ``digits-relu``, and an entry that does not load (served with
    --skip-bad-models, listed as not ready)."""
    from smartmixed.export.repository import export_run
    from smartmixed.train.data import load_dataset
    from smartmixed.train.loop import TrainConfig, train_run

    runs = tmp_path_factory.mktemp("page-runs")
    models = tmp_path_factory.mktemp("page-models")
    mnist = load_dataset("mnist", seed=42)
    tiny = {"arch": [784, 32, 10], "lr": 3e-3, "batch_size": 256}
    for name, config, lowering in (
        # auto: export times the lowerings, so the card has a latency to show
        ("mnist-mixed", TrainConfig(**tiny, p1_epochs=1, p2_epochs=1), "auto"),
        ("mnist-relu", TrainConfig(**tiny, mode="fixed:relu", epochs=2), "permuted"),
    ):
        train_run(config=config, dataset=mnist, out=runs / name, progress=False)
        export_run(run_dir=runs / name, repository=models, name=name, lowering=lowering)
    # a copy under another name: Triton's rule is name = folder = config.pbtxt's name
    shutil.copytree(repository / "relu", models / "digits-relu")
    config = models / "digits-relu" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "relu"', 'name: "digits-relu"', 1))
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX model")
    return models


@pytest.fixture(scope="module")
def browser():
    """One headless Debian chromium per module, driven through Debian's chromedriver (never
    Selenium Manager, which would download a browser); its console log is readable with
    ``browser.get_log("browser")``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} missing: `make system-deps` installs chromium and chromium-driver"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
