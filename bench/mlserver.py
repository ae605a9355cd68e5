"""MLServer 1.7 beside smartmixed-serve, for ``smartmixed-bench http --against-mlserver``.

``start_mlserver`` serves one exported smartmixed model (NAME/VERSION/model.onnx) with MLServer:
it writes a temporary folder holding MLServer's settings.json (127.0.0.1, free HTTP, gRPC and
metrics ports) and NAME/model-settings.json (the custom runtime of bench/mlserver_runtime.py,
copied beside it, over the model.onnx, with the model's input and output metadata), runs
``mlserver start`` from MLServer's own environment (.venv-mlserver, ``make mlserver``: MLServer
1.7 pins fastapi<0.116, which the project's .venv cannot hold), waits until the model answers
ready, and stops it by PID (SIGTERM, then kill) when the block ends.

MLServer's settings (``MLSERVER_SETTINGS``, recorded in every result): ``parallel_workers`` 0,
i.e. inference on the server's own event loop; with MLServer's default (1 worker process fed
through multiprocessing queues) and with its adaptive batching (64 rows, 1 ms) it answered fewer
requests per second at both concurrency 1 and 64 on the 2-core machine (docs/results.md), so the
comparison gives MLServer the settings it does best with. ``debug`` false (no per-request
access log, as smartmixed-serve's ``--log-level warning``). The model runs with 1 intra-op
thread (mlserver_runtime.INTRA_OP_THREADS), as smartmixed-serve with ``--intra-op-threads 1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smartmixed.bench import BenchError
from smartmixed.bench.server import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    free_port,
    wait_ready,
)
from smartmixed.contract import INPUT

ROOT = Path(__file__).resolve().parents[1]  # the repository (an editable install)
MLSERVER_VENV = ROOT / ".venv-mlserver"
RUNTIME_FILE = Path(__file__).with_name("mlserver_runtime.py")
RUNTIME_CLASS = "mlserver_runtime.OnnxRuntimeModel"
MLSERVER_SETTINGS = {"parallel_workers": 0, "debug": False}


class MLServerMissing(BenchError):
    """.venv-mlserver (or its mlserver command) is not there."""


def mlserver_path() -> Path:
    """.venv-mlserver/bin/mlserver (which may not exist)."""
    return MLSERVER_VENV / "bin" / "mlserver"


def mlserver_command() -> Path:
    """The mlserver command of .venv-mlserver, or MLServerMissing saying how to make it."""
    exe = mlserver_path()
    if not exe.is_file():
        raise MLServerMissing(
            f"--against-mlserver: {exe} is missing (run make mlserver to create "
            f"{MLSERVER_VENV.name})"
        )
    return exe


def mlserver_version() -> str:
    """MLServer's version as its own environment reports it."""
    out = subprocess.run(
        [
            str(MLSERVER_VENV / "bin" / "python"),
            "-c",
            "import mlserver; print(mlserver.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or "unknown"


@dataclass
class MLServerProcess:
    """An ``mlserver start`` process whose model answered ready."""

    url: str  # http://127.0.0.1:PORT (REST)
    grpc_address: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    command: list[str]
    settings: dict
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        """Its Prometheus endpoint (metrics_port): gRPC calls by code, grpc_server_handled."""
        return f"http://127.0.0.1:{self.settings['metrics_port']}/metrics"


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
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        **MLSERVER_SETTINGS,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    model_dir = folder / name
    model_dir.mkdir(parents=True)
    shutil.copyfile(RUNTIME_FILE, model_dir / RUNTIME_FILE.name)
    batch = [-1, *input_shape[1:]]
    model_settings = {
        "name": name,
        "implementation": RUNTIME_CLASS,
        "parameters": {"uri": str(model_path.resolve()), "version": model_path.parent.name},
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": batch}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, n_classes]} for o in outputs],
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    return settings


@contextlib.contextmanager
def start_mlserver(
    model_path: Path,
    *,
    name: str,
    input_shape: list[int],
    outputs: list[str],
    n_classes: int,
    log_path: Path,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Iterator[MLServerProcess]:
    """MLServer serving ``model_path`` as ``name`` until the block ends (see the module doc)."""
    import tempfile

    exe = mlserver_command()
    with tempfile.TemporaryDirectory(prefix="smartmixed-mlserver-") as tmp:
        folder = Path(tmp)
        settings = write_model_folder(
            folder,
            model_path=model_path,
            name=name,
            input_shape=input_shape,
            outputs=outputs,
            n_classes=n_classes,
        )
        command = [str(exe), "start", str(folder)]
        # MLServer reads MLSERVER_* from the environment over settings.json: none may leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=folder,
                start_new_session=True,  # its worker processes, if any, in a group of its own
            )
        server = MLServerProcess(
            url=f"http://127.0.0.1:{settings['http_port']}",
            grpc_address=f"127.0.0.1:{settings['grpc_port']}",
            process=process,
            command=command,
            settings=settings,
            log_path=log_path,
        )
        try:
            wait_ready(
                server,
                timeout=ready_timeout,
                path=f"/v2/models/{name}/ready",
                what=f"mlserver (model {name!r})",
                interval=0.2,
            )
            yield server
        finally:
            stop_mlserver(process)


def stop_mlserver(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to MLServer's PID; after ``timeout``, kill its process group (the group this
    bench created for it with start_new_session: MLServer and its workers, nothing else)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
