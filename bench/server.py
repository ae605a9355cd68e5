"""The server under a bench: its models (``build_repository``, ``pick_models``), its process
(``run_server``: smartmixed-serve or MLServer, ready before the block, stopped after it;
``start_server``: smartmixed-serve on free ports; ``start_mlserver``: MLServer 1.7 on the same
model.onnx, for ``http --against-mlserver``) and what it answers (``model_info``,
``prepare_target``'s check request, ``batch_rows`` from /metrics).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from smartmixed.bench import BenchError
from smartmixed.contract import DEFAULT_POOL, INPUT, ModelSpec

GENERATED_MODELS = ("mixed", "fixed-relu")
READY_TIMEOUT_S = 60.0  # startup of a server: imports + loading every model
STOP_TIMEOUT_S = 15.0  # SIGTERM, then kill
HEALTH_READY_PATH = "/v2/health/ready"
BATCH_ROWS_METRIC = "smartmixed_batch_rows"  # histogram of rows per ONNX Runtime run, per model
LOOPBACK_NAMES = ("localhost",)


class ServerError(BenchError):
    """A server that did not start or answered unexpectedly, or a URL the benches must not
    target."""


def is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """A base URL http://127.0.0.1:PORT (loopback only: this bench floods what it targets)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ServerError(f"--url {url!r}: expected http://127.0.0.1:PORT")
    if not is_loopback(host := parts.hostname):
        raise ServerError(f"--url {url!r}: only a server on this machine (127.0.0.1) is benched")
    try:
        port = parts.port
    except ValueError:
        raise ServerError(f"--url {url!r}: bad port") from None
    if parts.path.strip("/") or parts.query:
        raise ServerError(f"--url {url!r}: give the server's base URL, without a path")
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{port or 80}"


def check_ready(url: str, error: type[BenchError]) -> str:
    """check_url's base URL of a running server that answers ready; ``error`` otherwise."""
    base = check_url(url)
    try:
        with http_client(timeout=3.0) as client:
            ready = client.get(base + HEALTH_READY_PATH).status_code
    except httpx.HTTPError as e:
        raise error(f"--url {url}: not reachable ({type(e).__name__}: {e})") from None
    if ready != 200:
        raise error(f"--url {url}: {HEALTH_READY_PATH} answered {ready}")
    return base


# --------------------------------------------------------------------------------------------
# Models


BENCH_QUEUE_DELAY_US = 500


def build_repository(
    root: Path, *, arch: Sequence[int], seed: int, models: Sequence[str] = GENERATED_MODELS
) -> None:
    """ROOT/{mixed,fixed-relu}: seeded random weights, written by export's own writer
    (``export_run``, permuted lowering: verified against PyTorch, with its config.pbtxt), so
    the bench serves what an exported repository serves. Each config.pbtxt states a batching
    delay of BENCH_QUEUE_DELAY_US, the delay of the benches' published figures (export writes
    none unless asked, and serve's own default is 1 ms)."""
    import tempfile

    import torch

    from smartmixed.export.repository import export_run
    from smartmixed.train.artifacts import save_model
    from smartmixed.train.model import MixedMLP

    arch = list(arch)
    hidden = arch[1:-1]
    rng = np.random.default_rng(seed)
    pool = list(DEFAULT_POOL)
    # uniformly random per neuron: every layer holds all six groups (the fragmented case)
    mixed = [[pool[i] for i in rng.integers(len(pool), size=w)] for w in hidden]
    assignments = {"mixed": (pool, mixed), "fixed-relu": (["relu"], [["relu"] * w for w in hidden])}
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as runs:
        torch.manual_seed(seed)  # seeded weights, caller's RNG untouched
        for name in models:
            pool_, assignment = assignments[name]
            spec = ModelSpec.untrained(arch=arch, pool=pool_, assignment=assignment)
            run = Path(runs) / name
            run.mkdir()
            save_model(run, spec, MixedMLP.from_spec(spec).canonical_state_dict())
            export_run(
                run_dir=run,
                repository=root,
                name=name,
                lowering="permuted",
                overwrite=True,
                max_queue_delay_us=BENCH_QUEUE_DELAY_US,
            )


def model_versions(folder: Path) -> list[int]:
    """The version folders (1, 2, ...) of one model of an exported repository."""
    return sorted(int(v.name) for v in folder.iterdir() if v.is_dir() and v.name.isdigit())


def pick_models(
    repository: Path | str, names: Sequence[str] | None, error: type[BenchError]
) -> tuple[Path, list[str]]:
    """``names`` (None: every model) of the exported repository, checked: ``error`` names the
    folder, the models missing and the ones it holds."""
    repository = Path(repository)
    if not repository.is_dir():
        raise error(f"--repository {repository} is not a folder")
    present = sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and not p.name.startswith(".") and model_versions(p)
    )
    names = list(names or present)
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise error(
            f"--repository {repository}: no model(s) {', '.join(missing) or '(none)'}; it holds "
            f"{', '.join(present) or 'nothing'}"
        )
    return repository, names


# --------------------------------------------------------------------------------------------
# Process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_client(timeout: float = 10.0) -> httpx.Client:
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic
    return httpx.Client(timeout=timeout, trust_env=False)


def server_env() -> dict[str, str]:
    """The SMARTMIXED_* settings the started servers inherit (the API key left out)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("SMARTMIXED_") and k != "SMARTMIXED_API_KEY"
    }


def server_command(repository: Path, port: int, *args: str, grpc_port: int = 0) -> list[str]:
    """The smartmixed-serve command line for ``repository`` on 127.0.0.1:``port``, its gRPC
    endpoint on ``grpc_port`` (0: off; the serve default, 8001, is one port for the whole machine
    and a bench's servers must not take it from a user's, nor from each other)."""
    flags = ["--repository", str(repository), "--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "smartmixed.serve", *flags, "--grpc-port", str(grpc_port), *args]


@dataclass
class ServerProcess:
    """A server subprocess that answered ready: smartmixed-serve, or MLServer."""

    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    command: list[str]
    log_path: Path
    grpc_address: str | None = None  # 127.0.0.1:PORT, when its gRPC endpoint is on
    metrics_url: str | None = None  # its Prometheus endpoint
    settings: dict[str, Any] | None = None  # MLServer's settings.json

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def run_server(
    command: list[str],
    *,
    url: str,
    log_path: Path,
    ready_path: str = HEALTH_READY_PATH,
    what: str = "the server",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    nofile: int | None = None,
    **fields: Any,
) -> Iterator[ServerProcess]:
    """Run ``command`` (output to ``log_path``, in a process group of its own) until the block
    ends, once ``url + ready_path`` answers 200; then SIGTERM, and after STOP_TIMEOUT_S kill the
    group (the server and its workers, nothing else). ``nofile`` sets the child's open-file
    limit (soft and hard) before exec, as ``ulimit -n`` would; ``fields`` go to ServerProcess."""

    def set_nofile() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=set_nofile if nofile else None,
        )
    try:
        _wait_ready(process, url + ready_path, log_path, what)
        yield ServerProcess(url=url, process=process, command=command, log_path=log_path, **fields)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT_S)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(process: subprocess.Popen, url: str, log_path: Path, what: str) -> None:
    """Poll ``url`` until it answers 200; ServerError with the log's tail when the process
    exits first or READY_TIMEOUT_S passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with http_client(timeout=2.0) as client:
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    tail = log_path.read_text(errors="replace").strip()[-1500:] or "(no output)"
    if process.poll() is not None:
        raise ServerError(
            f"{what} exited with status {process.returncode} before it was ready: {tail}"
        )
    raise ServerError(f"{what} was not ready within {READY_TIMEOUT_S:.0f} s: {tail}")


def start_server(
    repository: Path,
    *,
    log_path: Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    nofile: int | None = None,
    grpc: bool = False,
) -> contextlib.AbstractContextManager[ServerProcess]:
    """smartmixed-serve on a free 127.0.0.1 port until the block ends (``run_server``), its
    gRPC endpoint on a second one when ``grpc``; ``args``: more of its flags; ``env`` laid over
    this process's environment less SMARTMIXED_API_KEY (the benches send no key)."""
    port = free_port()
    grpc_port = free_port() if grpc else 0
    child_env = {k: v for k, v in os.environ.items() if k != "SMARTMIXED_API_KEY"}
    return run_server(
        server_command(repository, port, *args, grpc_port=grpc_port),
        url=f"http://127.0.0.1:{port}",
        log_path=log_path,
        env=child_env | dict(env or {}),
        nofile=nofile,
        grpc_address=f"127.0.0.1:{grpc_port}" if grpc else None,
        metrics_url=f"http://127.0.0.1:{port}/metrics",
    )


# --------------------------------------------------------------------------------------------
# MLServer 1.7 beside smartmixed-serve (http --against-mlserver), from its own environment
# (.venv-mlserver, make mlserver: MLServer 1.7 pins fastapi<0.116, which .venv cannot hold),
# through the custom runtime of bench/mlserver_runtime.py. MLSERVER_SETTINGS: inference on the
# server's own event loop (parallel_workers 0; a worker process, or adaptive batching, answered
# fewer requests per second here: docs/results.md) and no access log (debug false), as
# smartmixed-serve's --log-level warning.

MLSERVER_VENV = Path(__file__).resolve().parents[1] / ".venv-mlserver"  # in the repository
RUNTIME_FILE = Path(__file__).with_name("mlserver_runtime.py")
RUNTIME_CLASS = "mlserver_runtime.OnnxRuntimeModel"
MLSERVER_SETTINGS = {"parallel_workers": 0, "debug": False}


def mlserver_command() -> Path:
    """The mlserver command of .venv-mlserver, or BenchError saying how to make it."""
    exe = MLSERVER_VENV / "bin" / "mlserver"
    if not exe.is_file():
        raise BenchError(
            f"--against-mlserver: {exe} is missing (run make mlserver to create "
            f"{MLSERVER_VENV.name})"
        )
    return exe


def mlserver_version() -> str:
    """MLServer's version as its own environment reports it."""
    code = "import mlserver; print(mlserver.__version__)"
    python = str(MLSERVER_VENV / "bin" / "python")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "unknown"


def write_model_folder(
    folder: Path,
    *,
    model_path: Path,
    name: str,
    input_shape: list[int],
    outputs: list[str],
    n_classes: int,
) -> dict:
    """FOLDER/settings.json and FOLDER/NAME/{model-settings.json,mlserver_runtime.py}; returns
    the server settings written."""
    ports = {key: free_port() for key in ("http_port", "grpc_port", "metrics_port")}
    settings = {"host": "127.0.0.1", **ports, **MLSERVER_SETTINGS}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    model_dir = folder / name
    model_dir.mkdir(parents=True)
    shutil.copyfile(RUNTIME_FILE, model_dir / RUNTIME_FILE.name)
    model_settings = {
        "name": name,
        "implementation": RUNTIME_CLASS,
        "parameters": {"uri": str(model_path.resolve()), "version": model_path.parent.name},
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *input_shape[1:]]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, n_classes]} for o in outputs],
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    return settings


@contextlib.contextmanager
def start_mlserver(
    model_path: Path, *, name: str, log_path: Path, **model: Any
) -> Iterator[ServerProcess]:
    """MLServer serving ``model_path`` as ``name`` until the block ends, ready once the model
    answers ready; ``model``: write_model_folder's input_shape, outputs and n_classes."""
    exe = mlserver_command()
    with tempfile.TemporaryDirectory(prefix="smartmixed-mlserver-") as tmp:
        folder = Path(tmp)
        settings = write_model_folder(folder, model_path=model_path, name=name, **model)
        # MLServer reads MLSERVER_* from the environment over settings.json: none may leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
        with run_server(
            [str(exe), "start", str(folder)],
            url=f"http://127.0.0.1:{settings['http_port']}",
            log_path=log_path,
            ready_path=f"/v2/models/{name}/ready",
            what=f"mlserver (model {name!r})",
            env=env,
            cwd=folder,
            grpc_address=f"127.0.0.1:{settings['grpc_port']}",
            metrics_url=f"http://127.0.0.1:{settings['metrics_port']}/metrics",
            settings=settings,
        ) as server:
            yield server


# --------------------------------------------------------------------------------------------
# Answers


@dataclass
class Target:
    """One model on one server: the V2 JSON request the load generators send."""

    name: str
    url: str  # .../v2/models/NAME/infer
    body: bytes
    n_features: int


def request_body(n_features: int, seed: int) -> bytes:
    """One V2 JSON request: a seeded row of raw pixels (integers 0..255) as FP32 [1, D]."""
    row = np.random.default_rng(seed).integers(0, 256, n_features).tolist()
    body = {"inputs": [{"name": INPUT, "shape": [1, n_features], "datatype": "FP32", "data": row}]}
    return json.dumps(body, separators=(",", ":")).encode()


def _ask(base: str, name: str, path: str = "", *, what: str = "", **post: Any) -> Any:
    """The JSON answer to GET (with ``post``: POST) BASE/v2/models/NAME/PATH; ServerError
    naming the model (and ``what``, the request) for no answer, a status other than 200 or a
    body that is not JSON."""
    url = f"{base}/v2/models/{name}{path}"
    what = what or f"GET /v2/models/{name}{path}"
    try:
        with http_client() as client:
            answer = client.post(url, **post) if post else client.get(url)
    except httpx.HTTPError as e:
        raise ServerError(f"model {name!r}: {base} failed ({type(e).__name__}: {e})") from None
    if answer.status_code != 200:
        raise ServerError(
            f"model {name!r}: {what} answered {answer.status_code}: {answer.text[:300]}"
        )
    try:
        return answer.json()
    except ValueError:
        raise ServerError(f"model {name!r}: {what} answered {answer.text[:300]!r}") from None


def model_info(base: str, name: str) -> dict[str, Any]:
    """smartmixed-serve's description of ``name``: mode, architecture, input_shape (batch axis
    1), outputs and n_classes (what MLServer's model settings need)."""
    info = _ask(base, name)
    try:
        smartmixed = info.get("smartmixed") or {}
        return {
            "mode": smartmixed.get("mode"),
            "architecture": smartmixed.get("architecture"),
            "input_shape": [1, *(int(d) for d in info["inputs"][0]["shape"][1:])],
            "outputs": [o["name"] for o in info["outputs"]],
            "n_classes": int(info["outputs"][0]["shape"][-1]),
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"model {name!r}: unexpected metadata {info!r:.300}") from None


def config_batching(base: str, name: str) -> str:
    """on or off, as the model config of a server this bench did not start says; unknown when
    it cannot be read."""
    try:
        return "on" if "dynamic_batching" in _ask(base, name, "/config") else "off"
    except (ServerError, TypeError):
        return "unknown"


def check_shapes(name: str, got: dict, n_classes: int, outputs: Sequence[str], what: str) -> None:
    """ServerError unless the check call ``what`` answered every output as [1, classes]."""
    want = {key: [1, n_classes] for key in outputs}
    if got != want:
        raise ServerError(f"model {name!r}: the {what} returned shapes {got}, expected {want}")


def prepare_target(base: str, name: str, *, seed: int) -> Target:
    """Read the model's metadata, build its request body and check that one request works."""
    info = model_info(base, name)
    n_features = info["input_shape"][-1]
    body = request_body(n_features, seed)
    headers = {"Content-Type": "application/json"}
    answer = _ask(base, name, "/infer", what="the check request", content=body, headers=headers)
    try:
        got = {o.get("name"): o.get("shape") for o in answer.get("outputs", [])}
    except AttributeError:  # JSON of another shape
        raise ServerError(
            f"model {name!r}: unexpected answer from {base}: {answer!r:.300}"
        ) from None
    check_shapes(name, got, info["n_classes"], info["outputs"], "check request")
    return Target(name=name, url=f"{base}/v2/models/{name}/infer", body=body, n_features=n_features)


def read_prometheus(url: str) -> list:
    """The metric families at ``url``; ServerError when they cannot be read."""
    try:
        with http_client(timeout=5.0) as client:
            response = client.get(url)
        response.raise_for_status()
        return list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError) as e:
        raise ServerError(
            f"cannot read the server's metrics at {url}: {type(e).__name__}: {e}"
        ) from None


def batch_rows(base: str, model: str) -> tuple[float, float] | None:
    """(rows, runs) so far from the server's histogram of rows per ONNX Runtime run; None when
    unavailable."""
    try:
        families = read_prometheus(f"{base}/metrics")
    except ServerError:
        return None
    found = {
        sample.name.removeprefix(BATCH_ROWS_METRIC): sample.value
        for family in families
        if family.name == BATCH_ROWS_METRIC
        for sample in family.samples  # _bucket, _sum, _count (and _created) per label set
        if sample.labels == {"model": model}
    }
    if "_sum" not in found or "_count" not in found:
        return None
    return found["_sum"], found["_count"]
