"""MLServer 1.7 beside smartmixed-serve, for ``smartmixed-bench http --against-mlserver``.

``start_mlserver`` serves one exported model.onnx with MLServer from its own environment
(.venv-mlserver, ``make mlserver``: MLServer 1.7 pins fastapi<0.116, which .venv cannot hold),
through the custom runtime of bench/mlserver_runtime.py, on free 127.0.0.1 ports.
``MLSERVER_SETTINGS``: inference on the server's own event loop (``parallel_workers`` 0; a worker
process, or adaptive batching, answered fewer requests per second here: docs/results.md) and no
access log (``debug`` false), as smartmixed-serve's ``--log-level warning``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smartmixed.bench import BenchError
from smartmixed.bench.server import ServerProcess, free_port, run_server
from smartmixed.contract import INPUT

ROOT = Path(__file__).resolve().parents[1]  # the repository (an editable install)
MLSERVER_VENV = ROOT / ".venv-mlserver"
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
