"""Tampered and hostile run and data files, as a table.

Each row: how a file is changed (from one tiny real run, copied per row), the command that reads
it (smartmixed-train with --data, --resume or --compare; smartmixed-export), the exact one-line
message, a non-zero exit, and nothing written (the case folder's listing, sizes, mtimes and
digests unchanged). Every row also runs within a time limit (a FIFO must not hang a reader) and
within a memory bound (a device or a bomb must not be read without end, an architecture must not
be allocated before the weights are checked against it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import stat
import struct
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smartmixed.contract import MAX_JSON_DEPTH, MODEL_SPEC, MODEL_WEIGHTS, WEIGHTS_DIGEST
from smartmixed.export.cli import main as export_main
from smartmixed.train import artifacts
from smartmixed.train import data as data_module
from smartmixed.train.cli import main as train_main
from smartmixed.train.data import Dataset, load_dataset
from smartmixed.train.loop import TrainConfig, train_run

ARCH = "64,12,10"
# the options of the interrupted run, repeated by --resume
RESUME_OPTIONS = ["--data", "digits", "--arch", ARCH, "--p1-epochs", "1", "--p2-epochs", "2"]
RESUME_OPTIONS += ["--lr", "0.003", "--quiet"]
TIME_LIMIT_S = 20  # per row; each takes well under a second
MEMORY_LIMIT_MB = 200  # per row: peak RSS growth


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """done/: a finished run; cut/: a run stopped after its first phase-2 epoch, so that its
    checkpoint holds every field (assignment, phase-1 metrics, Adam's moments)."""
    root = tmp_path_factory.mktemp("tampered")
    config = TrainConfig(arch=[64, 12, 10], p1_epochs=1, p2_epochs=1, lr=3e-3)
    train_run(config=config, dataset=digits, out=root / "done", progress=False)

    def interrupt(record: dict) -> None:
        if record["epoch"] == 1:
            raise _Interrupt

    config = TrainConfig(arch=[64, 12, 10], p1_epochs=1, p2_epochs=2, lr=3e-3)
    with pytest.raises(_Interrupt):
        train_run(
            config=config, dataset=digits, out=root / "cut", progress=False, after_epoch=interrupt
        )
    return root


# --------------------------------------------------------------------------------------------
# Tampering: each function changes files under a case folder


def _spec(case: Path) -> dict:
    return json.loads((case / "run" / MODEL_SPEC).read_text())


def _write_spec(case: Path, spec: dict) -> None:
    (case / "run" / MODEL_SPEC).write_text(json.dumps(spec))


def spec_change(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """A tampering of model.json: ``change`` edits the parsed spec in place."""

    def tamper(case: Path) -> None:
        spec = _spec(case)
        change(spec)
        _write_spec(case, spec)

    return tamper


def spec_text(text: Callable[[str], str]) -> Callable[[Path], None]:
    def tamper(case: Path) -> None:
        path = case / "run" / MODEL_SPEC
        path.write_text(text(path.read_text()))

    return tamper


def arch_1e999(case: Path) -> None:
    """arch [64, 1e999, 10]: JSON reads 1e999 as the float inf."""
    spec = _spec(case)
    spec["arch"] = [64, "HUGE", 10]
    (case / "run" / MODEL_SPEC).write_text(json.dumps(spec).replace('"HUGE"', "1e999"))


def wide_arch(widths: list[int]) -> Callable[[Path], None]:
    """model.json claims hidden layers of ``widths`` (a valid spec of its own), the weights
    stay the small run's."""

    def change(spec: dict) -> None:
        spec["arch"] = [64, *widths, 10]
        spec["assignment"] = [["relu"] * w for w in widths]

    return spec_change(change)


def weights_change(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """A tampering of model.safetensors (model.json, and its digest, left as they are)."""

    def tamper(case: Path) -> None:
        path = case / "run" / MODEL_WEIGHTS
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata()
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)

    return tamper


def replace_with(name: str, kind: str) -> Callable[[Path], None]:
    """``name`` (relative to the case folder) replaced by a FIFO, a link to /dev/zero, or a
    sparse file one byte over model.json's limit."""

    def tamper(case: Path) -> None:
        path = case / name
        path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "zero":
            path.symlink_to("/dev/zero")
        else:
            with path.open("wb") as f:
                f.truncate(artifacts.MAX_SPEC_BYTES + 1)

    return tamper


def checkpoint_change(
    change: Callable[[dict[str, torch.Tensor], dict], Any],
) -> Callable[[Path], None]:
    """A tampering of checkpoint.safetensors: ``change`` edits its tensors and JSON state in
    place; the state is written back as JSON (a str it returns is written as it is)."""

    def tamper(case: Path) -> None:
        path = case / "run" / artifacts.CHECKPOINT
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            state = json.loads(f.metadata()["state"])
        text = change(tensors, state)
        metadata = (
            {} if text is False else {"state": text if isinstance(text, str) else json.dumps(state)}
        )
        save_file(tensors, str(path), metadata=metadata)

    return tamper


def checkpoint_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def tamper(case: Path) -> None:
        path = case / "run" / artifacts.CHECKPOINT
        path.write_bytes(change(path.read_bytes()))

    return tamper


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nan_everywhere(tensors: dict, state: dict) -> None:
    for name, tensor in tensors.items():
        if name.startswith(("model.", "best.")) and tensor.is_floating_point():
            tensor.fill_(float("nan"))


def _drop(name: str) -> Callable[[dict, dict], None]:
    return lambda tensors, state: tensors.pop(name)


def _set(name: str, value: torch.Tensor) -> Callable[[dict, dict], None]:
    return lambda tensors, state: tensors.__setitem__(name, value)


def _run_field(key: str, value: Any) -> Callable[[dict, dict], None]:
    return lambda tensors, state: state["run"].__setitem__(key, value)


def csv_file(text: str, name: str = "d.csv", encoding: str = "utf-8") -> Callable[[Path], str]:
    def write(case: Path) -> str:
        (case / name).write_text(text, encoding=encoding)
        return f"csv:{case / name}"

    return write


def _rows(n: int) -> str:
    """``n`` valid rows of a, b, label: enough that a run trains on them once the row a case
    adds is read (as it was, silently, before it was refused)."""
    return "".join(f"{i % 3},{i},{i % 2}\n" for i in range(n))


def device_data(kind: str) -> Callable[[Path], str]:
    def make(case: Path) -> str:
        if kind == "zero":
            return "csv:/dev/zero"
        os.mkfifo(case / "d.csv")
        return f"csv:{case / 'd.csv'}"

    return make


def npz_declaring(size: int) -> Callable[[Path], str]:
    """An NPZ whose zip directory declares x.npy ``size`` bytes long (a bomb as small as its
    directory says it is not): read, it would take them all."""

    def make(case: Path) -> str:
        path = case / "d.npz"
        np.savez(path, x=np.zeros((60, 2), np.float32), y=np.arange(60) % 2)
        raw = bytearray(path.read_bytes())
        entry = raw.index(b"PK\x01\x02")
        while raw[entry + 46 : entry + 46 + 5] != b"x.npy":
            entry = raw.index(b"PK\x01\x02", entry + 4)
        struct.pack_into("<I", raw, entry + 24, size)  # the central directory's file size
        path.write_bytes(bytes(raw))
        return f"npz:{path}"

    return make


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # train (with --data), resume, export, compare
    tamper: Callable[[Path], Any]  # train: returns the --data source
    message: str  # {run}, {ckpt}, {case} stand for the case's paths


SPEC = "{run}/model.json"
WEIGHTS = "{run}/model.safetensors"
CKPT = "{ckpt}"
ARCH_MISMATCH = "tensors do not match the run these options train"

CASES = [
    # ---- model.json, read by export and by --compare
    Case(
        "spec nested 10^5 deep",
        "export",
        spec_text(lambda text: nested(100_000)),
        f"{SPEC}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
    ),
    Case(
        "spec nested 10^5 deep",
        "compare",
        spec_text(lambda text: nested(100_000)),
        f"{SPEC}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
    ),
    Case(
        "1e999 in arch",
        "export",
        arch_1e999,
        f"{SPEC}: spec field 'arch': architecture [64, inf, 10] is not a list of integers",
    ),
    Case(
        "1e999 in arch",
        "compare",
        arch_1e999,
        f"{SPEC}: spec field 'arch': architecture [64, inf, 10] is not a list of integers",
    ),
    Case(
        "preprocessing null",
        "export",
        spec_change(lambda s: s.__setitem__("preprocessing", None)),
        f"{SPEC}: spec field 'preprocessing': expected an object with offset and scale, got null",
    ),
    Case(
        "preprocessing a list",
        "compare",
        spec_change(lambda s: s.__setitem__("preprocessing", [0.0, 1.0])),
        f"{SPEC}: spec field 'preprocessing': expected an object with offset and scale, got a list",
    ),
    Case(
        "training a list",
        "export",
        spec_change(lambda s: s.__setitem__("training", [])),
        f"{SPEC}: spec field 'training': expected an object, got a list",
    ),
    Case(
        "data_request source a number",
        "export",
        spec_change(lambda s: s["training"]["data_request"].__setitem__("source", 5)),
        f"{SPEC}: spec field 'training.data_request.source': expected a string, got an integer",
    ),
    Case(
        "data_request with an unknown key",
        "export",
        spec_change(lambda s: s["training"]["data_request"].__setitem__("shuffle", True)),
        f"{SPEC}: spec field 'training.data_request': unknown key(s) shuffle",
    ),
    Case(
        "data_request a string",
        "export",
        spec_change(lambda s: s["training"].__setitem__("data_request", "digits")),
        f"{SPEC}: spec field 'training.data_request': expected an object, got a string",
    ),
    Case(
        "data_request val_fraction 7",
        "export",
        spec_change(lambda s: s["training"]["data_request"].__setitem__("val_fraction", 7)),
        "{run}: cannot reload the run's test data to verify on it (validation fraction 7: "
        "expected a number between 0 and 1)",
    ),
    Case(
        "pool holds a number",
        "export",
        spec_change(lambda s: s.__setitem__("pool", ["relu", 5])),
        f"{SPEC}: spec field 'pool': expected a list of activation names, item 1 is an integer",
    ),
    Case(
        "mode an object",
        "compare",
        spec_change(lambda s: s.__setitem__("mode", {"fixed": "relu"})),
        f"{SPEC}: spec field 'mode': expected 'smartmixed' or 'fixed:' and an activation of the "
        "pool, got {'fixed': 'relu'}",
    ),
    Case(
        "metrics.test_accuracy a string",
        "compare",
        spec_change(lambda s: s["metrics"].__setitem__("test_accuracy", "0.99")),
        f"{SPEC}: spec field 'metrics.test_accuracy': expected a number, got a string",
    ),
    Case(
        "weights digest not hexadecimal",
        "export",
        spec_change(lambda s: s.__setitem__(WEIGHTS_DIGEST, "abc")),
        f"{SPEC}: field '{WEIGHTS_DIGEST}': expected 64 lowercase hexadecimal digits, got 'abc'",
    ),
    Case(
        "model.json a FIFO",
        "export",
        replace_with("run/model.json", "fifo"),
        f"{SPEC}: a FIFO, not a regular file",
    ),
    Case(
        "model.json a FIFO",
        "compare",
        replace_with("run/model.json", "fifo"),
        f"{SPEC}: a FIFO, not a regular file",
    ),
    Case(
        "model.json larger than its limit",
        "export",
        replace_with("run/model.json", "sparse"),
        f"{SPEC}: {artifacts.MAX_SPEC_BYTES + 1} bytes, more than the limit of "
        f"{artifacts.MAX_SPEC_BYTES} bytes",
    ),
    # ---- model.safetensors, read by export
    Case(
        "weights a link to /dev/zero",
        "export",
        replace_with("run/model.safetensors", "zero"),
        f"{WEIGHTS}: a character device, not a regular file",
    ),
    Case(
        "weights a FIFO",
        "export",
        replace_with("run/model.safetensors", "fifo"),
        f"{WEIGHTS}: a FIFO, not a regular file",
    ),
    Case(
        "arch 64,100000,100000,10 (40 GB if allocated)",
        "export",
        wide_arch([100_000, 100_000]),
        f"{WEIGHTS}: weights do not match the architecture: missing tensor(s) layers.2.bias, "
        "layers.2.weight",
    ),
    Case(
        "arch 64,1000000,10 (300 MB if allocated)",
        "export",
        wide_arch([1_000_000]),
        f"{WEIGHTS}: tensor layers.0.weight: expected shape [1000000, 64], got [12, 64]",
    ),
    Case(
        "weights int32",
        "export",
        weights_change(lambda t: t.__setitem__("layers.0.weight", t["layers.0.weight"].int())),
        f"{WEIGHTS}: tensor layers.0.weight: dtype I32, expected F32",
    ),
    Case(
        "weights bool",
        "export",
        weights_change(lambda t: t.__setitem__("layers.1.bias", t["layers.1.bias"] > 0)),
        f"{WEIGHTS}: tensor layers.1.bias: dtype BOOL, expected F32",
    ),
    Case(
        "weights float16",
        "export",
        weights_change(lambda t: t.__setitem__("layers.1.weight", t["layers.1.weight"].half())),
        f"{WEIGHTS}: tensor layers.1.weight: dtype F16, expected F32",
    ),
    Case(
        "weights not the ones model.json was saved with (a retraining between reads)",
        "export",
        weights_change(lambda t: t["layers.0.weight"].mul_(1.01)),
        "{run}: model.safetensors is not the file model.json was saved with (its sha256 "
        f"differs from the recorded {WEIGHTS_DIGEST}): the run folder changed while it was read "
        "(retrained?) or one of the two files was replaced; read it again once nothing writes "
        "to it",
    ),
    # ---- checkpoint.safetensors, read by --resume
    Case(
        "checkpoint without rng.torch",
        "resume",
        checkpoint_change(_drop("rng.torch")),
        f"{CKPT}: {ARCH_MISMATCH}: missing tensor(s) rng.torch",
    ),
    Case(
        "checkpoint state without config",
        "resume",
        checkpoint_change(lambda tensors, state: state.pop("config")),
        f"{CKPT}: metadata 'state': field 'config' missing",
    ),
    Case(
        "checkpoint config a list",
        "resume",
        checkpoint_change(lambda tensors, state: state.__setitem__("config", [])),
        f"{CKPT}: metadata 'state': field 'config' is a list, not an object",
    ),
    Case(
        "checkpoint phase_index 5",
        "resume",
        checkpoint_change(_run_field("phase_index", 5)),
        f"{CKPT}: run state field 'phase_index': expected an integer in 0..1 (this run's phases),"
        " got 5",
    ),
    Case(
        "checkpoint phase_index a string",
        "resume",
        checkpoint_change(_run_field("phase_index", "1")),
        f"{CKPT}: run state field 'phase_index': expected an integer in 0..1 (this run's phases),"
        " got '1'",
    ),
    Case(
        "checkpoint phase_epoch 9",
        "resume",
        checkpoint_change(_run_field("phase_epoch", 9)),
        f"{CKPT}: run state field 'phase_epoch': expected an integer in 0..2 (phase mixed's "
        "epochs), got 9",
    ),
    Case(
        "checkpoint model tensor of another shape",
        "resume",
        checkpoint_change(_set("model.layers.0.weight", torch.zeros(12, 63))),
        f"{CKPT}: tensor model.layers.0.weight: expected shape [12, 64], got [12, 63]",
    ),
    Case(
        "checkpoint without a kept tensor",
        "resume",
        checkpoint_change(_drop("best.layers.1.bias")),
        f"{CKPT}: {ARCH_MISMATCH}: missing tensor(s) best.layers.1.bias",
    ),
    Case(
        "checkpoint Adam moment of another shape",
        "resume",
        checkpoint_change(_set("optim.0.exp_avg", torch.zeros(3))),
        f"{CKPT}: tensor optim.0.exp_avg: expected shape [12, 64], got [3]",
    ),
    Case(
        "checkpoint Adam state of a parameter partly missing",
        "resume",
        checkpoint_change(_drop("optim.2.exp_avg_sq")),
        f"{CKPT}: {ARCH_MISMATCH}: missing tensor(s) optim.2.exp_avg_sq",
    ),
    Case(
        "checkpoint model tensor int64",
        "resume",
        checkpoint_change(_set("model.layers.1.bias", torch.zeros(10, dtype=torch.int64))),
        f"{CKPT}: tensor model.layers.1.bias: dtype I64, expected F32",
    ),
    Case(
        "checkpoint rng.torch of another length",
        "resume",
        checkpoint_change(_set("rng.torch", torch.zeros(100, dtype=torch.uint8))),
        f"{CKPT}: tensor rng.torch: expected shape [{torch.get_rng_state().numel()}], got [100]",
    ),
    Case(
        "checkpoint rng.data float32",
        "resume",
        checkpoint_change(_set("rng.data", torch.zeros(torch.get_rng_state().numel()))),
        f"{CKPT}: tensor rng.data: dtype F32, expected U8",
    ),
    Case(
        "checkpoint rng.torch not a generator state",
        "resume",
        checkpoint_change(_set("rng.torch", torch.zeros_like(torch.get_rng_state()))),
        f"{CKPT}: tensor rng.torch is not a random generator's state (Invalid mt19937 state)",
    ),
    Case(
        "checkpoint full of NaN",
        "resume",
        checkpoint_change(_nan_everywhere),
        f"{CKPT}: tensor best.layers.0.bias holds 12 NaN values; tensor best.layers.0.weight "
        "holds 768 NaN values; tensor best.layers.1.bias holds 10 NaN values; tensor "
        "best.layers.1.weight holds 120 NaN values; and 4 more",
    ),
    Case(
        "checkpoint best_val_loss NaN",
        "resume",
        checkpoint_change(_run_field("best_val_loss", float("nan"))),
        f"{CKPT}: run state field 'best_val_loss': expected a number, not NaN, got nan",
    ),
    Case(
        "checkpoint assignment of another width",
        "resume",
        checkpoint_change(_run_field("assignment", [["relu"] * 11])),
        f"{CKPT}: run state field 'assignment': expected a name of the pool per neuron of "
        "layers [12], got [['relu', 'relu', 'relu', 'relu', 'relu', 'relu', 'relu',...",
    ),
    Case(
        "checkpoint history shorter than its epochs",
        "resume",
        checkpoint_change(lambda tensors, state: state["run"]["history"].pop()),
        f"{CKPT}: run state field 'history': expected a list of 2 epoch records, got [{{'epoch': "
        "0, 'phase': 'selective', 'phase_epoch': 0, 'tr...",
    ),
    Case(
        "checkpoint history record without val_loss",
        "resume",
        checkpoint_change(lambda tensors, state: state["run"]["history"][1].pop("val_loss")),
        f"{CKPT}: run state field 'history[1]': expected numbers for val_loss",
    ),
    Case(
        "checkpoint run state with an unknown field",
        "resume",
        checkpoint_change(_run_field("epochs_left", 3)),
        f"{CKPT}: run state: unknown field(s) epochs_left",
    ),
    Case(
        "checkpoint optimizer learning rate changed",
        "resume",
        checkpoint_change(
            lambda tensors, state: state["optimizer"]["param_groups"][0].__setitem__("lr", 10.0)
        ),
        f"{CKPT}: optimizer state field 'param_groups': not the Adam groups these options build "
        "(parameter indices, learning rates, betas, ...)",
    ),
    Case(
        "checkpoint optimizer scalars",
        "resume",
        checkpoint_change(
            lambda tensors, state: state["optimizer"].__setitem__("scalars", {"0.step": 1e9})
        ),
        f"{CKPT}: optimizer state field 'scalars': expected {{}} (Adam keeps its state in "
        "tensors), got {'0.step': 1000000000.0}",
    ),
    Case(
        "checkpoint state nested 10^5 deep",
        "resume",
        checkpoint_change(lambda tensors, state: nested(100_000)),
        f"{CKPT}: metadata 'state': JSON nested deeper than {MAX_JSON_DEPTH} levels",
    ),
    Case(
        "checkpoint without a state",
        "resume",
        checkpoint_change(lambda tensors, state: False),
        f"{CKPT}: not a checkpoint (its metadata holds no 'state')",
    ),
    Case(
        "checkpoint truncated",
        "resume",
        checkpoint_bytes(lambda raw: raw[: 8 + int.from_bytes(raw[:8], "little") + 100]),
        f"{CKPT}: not a readable safetensors file (its tensors do not fill the 100 bytes after "
        "the header exactly, one after another)",
    ),
    Case(
        "checkpoint a FIFO",
        "resume",
        replace_with("run/checkpoint.safetensors", "fifo"),
        f"{CKPT}: a FIFO, not a regular file",
    ),
    Case(
        "checkpoint a link to /dev/zero",
        "resume",
        replace_with("run/checkpoint.safetensors", "zero"),
        f"{CKPT}: a character device, not a regular file",
    ),
    # ---- data files, read by training
    Case(
        "CSV field over 131,072 characters",
        "train",
        csv_file("a,b,label\n" + _rows(40) + "1," + "9" * 200_000 + ",0\n"),
        "{case}/d.csv line 42: field larger than field limit (131072)",
    ),
    Case(
        "CSV number with an underscore",
        "train",
        csv_file("a,b,label\n" + _rows(40) + "1_000,2,0\n"),
        "{case}/d.csv line 42: column 'a' value '1_000' is not a number",
    ),
    Case(
        "CSV number in non-ASCII digits",
        "train",
        csv_file("a,b,label\n" + _rows(40) + "1,\u0661\u0662,0\n"),
        "{case}/d.csv line 42: column 'b' value '\u0661\u0662' is not a number",
    ),
    Case(
        "CSV from /dev/zero",
        "train",
        device_data("zero"),
        "/dev/zero: a character device, not a regular file",
    ),
    Case(
        "CSV a FIFO",
        "train",
        device_data("fifo"),
        "{case}/d.csv: a FIFO, not a regular file",
    ),
    Case(
        "NPZ array declaring 4 GB",
        "train",
        npz_declaring(4_000_000_000),
        "{case}/d.npz: array 'x' takes 4000000000 bytes, more than the "
        f"{data_module.MAX_ARRAY_BYTES} the arrays read may take together",
    ),
]


def _argv(case: Case, folder: Path, source: Any) -> list[str]:
    run = folder / "run"
    if case.command == "train":
        arch = ["--arch", "2,4,2", "--mode", "fixed:relu", "--epochs", "1", "--quiet"]
        return ["--data", source, *arch, "--out", str(folder / "out")]
    if case.command == "resume":
        return [*RESUME_OPTIONS, "--out", str(run), "--resume"]
    if case.command == "compare":
        return ["--compare", str(run)]
    return [str(run), "--repository", str(folder / "models"), "--lowering", "permuted"]


def _listing(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` (links not followed): kind, size, mtime and, for a regular
    file, its sha256."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        status = path.lstat()
        digest = (
            hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(status.st_mode) else ""
        )
        listing[str(path.relative_to(folder))] = (
            stat.S_IFMT(status.st_mode),
            status.st_size,
            status.st_mtime_ns,
            digest,
        )
    return listing


@contextlib.contextmanager
def _time_limit(seconds: float, folder: Path) -> Iterator[None]:
    """Fails the test when the block runs longer than ``seconds``. A reader blocked opening a
    FIFO under ``folder`` is then released: a shell (another process: the blocked open may hold
    the GIL, in native code) opens the FIFO's writer end and closes it, again and again, so that
    the block ends and the failure is reported."""
    fifos = [str(p) for p in folder.rglob("*") if stat.S_ISFIFO(p.lstat().st_mode)]
    script = f'sleep {seconds}; while :; do for f; do : > "$f"; done; sleep 0.2; done'
    releaser = subprocess.Popen(["sh", "-c", script, "sh", *fifos]) if fifos else None
    started = time.monotonic()
    try:
        yield
    finally:
        if releaser is not None:
            releaser.kill()
            releaser.wait()
    assert time.monotonic() - started < seconds, f"still running after {seconds} s"


@contextlib.contextmanager
def _peak_rss_growth() -> Iterator[Callable[[], float]]:
    """Yields a function giving, once the block has run, how many MB the process's peak RSS
    rose above its RSS at the start. The peak is reset first where Linux allows it
    (/proc/self/clear_refs), else the lifetime peak (ru_maxrss) is compared."""

    def status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(text.split(f"{key}:")[1].split()[0]) / 1024  # kB -> MB

    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start, peak = status("VmRSS"), lambda: status("VmHWM")
    except OSError:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    yield lambda: peak() - start


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.id}" for c in CASES])
def test_tampered_file_is_refused_in_one_line_and_nothing_is_written(
    case: Case, runs: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    if case.command != "train":
        shutil.copytree(runs / ("cut" if case.command == "resume" else "done"), folder / "run")
    source = case.tamper(folder)
    before = _listing(folder)
    main = export_main if case.command == "export" else train_main
    with _time_limit(TIME_LIMIT_S, folder), _peak_rss_growth() as growth:
        code = main(_argv(case, folder, source))
    err = capsys.readouterr().err
    message = case.message
    for name, path in (
        ("{run}", folder / "run"),
        ("{ckpt}", folder / "run" / artifacts.CHECKPOINT),
    ):
        message = message.replace(name, str(path))
    message = message.replace("{case}", str(folder))
    prog = "smartmixed-export" if case.command == "export" else "smartmixed-train"
    expected = f"{prog}: error: {message}\n"
    assert (code, err) == (2, expected)
    assert _listing(folder) == before, "nothing may be written"
    assert growth() < MEMORY_LIMIT_MB


# --------------------------------------------------------------------------------------------
# The same readers accept what is not tampered


def test_the_untampered_copies_are_accepted(runs: Path, tmp_path: Path, capsys) -> None:
    """The table's commands succeed on the runs the rows tamper: each row fails by its
    tampering alone."""
    run = Path(shutil.copytree(runs / "done", tmp_path / "done"))
    assert train_main(["--compare", str(run)]) == 0
    models = tmp_path / "models"
    assert export_main([str(run), "--repository", str(models), "--lowering", "permuted"]) == 0
    cut = Path(shutil.copytree(runs / "cut", tmp_path / "cut"))
    assert train_main([*RESUME_OPTIONS, "--out", str(cut), "--resume"]) == 0
    assert capsys.readouterr().err == ""
    spec = json.loads((cut / MODEL_SPEC).read_text())
    weights = (cut / MODEL_WEIGHTS).read_bytes()
    assert spec[WEIGHTS_DIGEST] == hashlib.sha256(weights).hexdigest()


def test_a_run_saved_before_digests_loads_with_a_one_line_warning(
    runs: Path, tmp_path: Path, capsys
) -> None:
    run = Path(shutil.copytree(runs / "done", tmp_path / "old"))
    spec = json.loads((run / MODEL_SPEC).read_text())
    del spec[WEIGHTS_DIGEST]
    (run / MODEL_SPEC).write_text(json.dumps(spec))
    loaded, _ = artifacts.load_model(run)
    assert loaded.arch == [64, 12, 10]
    assert capsys.readouterr().err == (
        f"smartmixed: warning: {run / MODEL_SPEC} records no {WEIGHTS_DIGEST} (saved before runs "
        f"recorded one): {MODEL_WEIGHTS} is loaded without checking that the two belong "
        "together\n"
    )


def test_csv_with_a_byte_order_mark_reads_its_label_column(tmp_path: Path) -> None:
    """Spreadsheets write UTF-8 with a BOM; it used to turn 'label' into '\\ufefflabel'."""
    path = tmp_path / "bom.csv"
    path.write_text(
        "label,a,b\n" + "".join(f"{i % 2},{i},{i % 5}\n" for i in range(30)), "utf-8-sig"
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbflabel,")
    data = load_dataset(f"csv:{path}")
    assert data.labels == ["0", "1"] and data.n_features == 2


def test_npz_members_other_than_the_arrays_are_never_inflated(tmp_path: Path) -> None:
    """A zip bomb beside x and y (256 MB of zeros in 256 kB) is never decompressed."""
    path = tmp_path / "bomb.npz"
    x, y = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32), np.arange(30) % 3
    np.savez(path, x=x, y=y)
    with (
        zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("unused.npy", "w", force_zip64=True) as member,
    ):
        header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.uint8))
        header["shape"] = (256 * 2**20,)
        np.lib.format.write_array_header_1_0(member, header)
        zeros = bytes(2**20)
        for _ in range(256):
            member.write(zeros)
    assert path.stat().st_size < 2**20
    with _peak_rss_growth() as growth:
        data = load_dataset(f"npz:{path}")
    assert data.n_features == 3 and len(data.labels) == 3
    assert growth() < 64
