"""smartmixed-export as a careless operator meets it: file modes, unusable paths, NaN, configs."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from smartmixed.export.cli import main
from smartmixed.train import artifacts

UNWRITABLE = Path("/proc/sys")  # refused to everyone, root included


@pytest.fixture(scope="module")
def entry(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("exported")
    assert main([str(tiny_run), "--repository", str(models), "--lowering", "permuted"]) == 0
    return models / "tiny"


def _export(capsys, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--lowering", "permuted"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1
    return code, err


def _modes(root: Path) -> set[tuple[str, int]]:
    paths = [root, *root.rglob("*")]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_entries_are_world_readable_unless_private(
    tiny_run: Path, entry: Path, tmp_path: Path, capsys
) -> None:
    old_umask = os.umask(0o077)  # a strict umask must not make the entry unreadable either
    try:
        assert _modes(entry) == {("dir", 0o755), ("file", 0o644)}
        models = tmp_path / "models"
        assert _export(capsys, str(tiny_run), "--repository", str(models), "--private")[0] == 0
        assert _modes(models / "tiny") == {("dir", 0o700), ("file", 0o600)}
        # a new version into an existing private entry, exported public: the entry follows
        code, _ = _export(capsys, str(tiny_run), "--repository", str(models), "--version", "2")
        assert code == 0 and stat.S_IMODE((models / "tiny").stat().st_mode) == 0o755
        assert _modes(models / "tiny" / "2") == {("dir", 0o755), ("file", 0o644)}
        assert stat.S_IMODE((models / "tiny" / "config.pbtxt").stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


def test_unusable_repository_paths_are_refused_before_any_work(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").write_text("")  # a file where the entry would go
    expected = {
        str(a_file): f"--repository {a_file}: is not a folder",
        str(a_file / "models"): f"--repository {a_file / 'models'}: would be created in "
        f"{a_file}, which is not a folder",
        str(tmp_path / "models"): f"{tmp_path / 'models' / 'tiny'} exists and is not a folder",
    }
    if not os.access(UNWRITABLE, os.W_OK):
        expected[str(UNWRITABLE / "models")] = (
            f"--repository {UNWRITABLE / 'models'}: would be created in {UNWRITABLE}, which is "
            "not writable"
        )
    for repository, message in expected.items():
        assert _export(capsys, str(tiny_run), "--repository", repository) == (
            2,
            f"smartmixed-export: error: {message}\n",
        )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "models", "tiny"]


def test_nan_or_inf_in_a_run_is_named_before_any_comparison(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    weights = artifacts.load_tensors(run / "model.safetensors")
    poisoned = weights["layers.1.weight"].clone()
    poisoned.view(-1)[:3] = float("nan")
    bias = weights["layers.0.bias"].clone()
    bias[0] = float("-inf")
    artifacts.save_tensors(
        run / "model.safetensors",
        {**weights, "layers.1.weight": poisoned, "layers.0.bias": bias},
    )
    models = tmp_path / "models"
    assert _export(capsys, str(run), "--repository", str(models)) == (
        2,
        f"smartmixed-export: error: {run / 'model.safetensors'}: weights layers.0.bias hold "
        "1 inf value; weights layers.1.weight hold 3 NaN values\n",
    )

    artifacts.save_tensors(run / "model.safetensors", weights)
    spec = json.loads((run / "model.json").read_text())
    spec["preprocessing"]["scale"] = float("inf")
    spec["preprocessing"]["offset"] = float("nan")
    (run / "model.json").write_text(json.dumps(spec))  # json writes NaN / Infinity literals
    assert _export(capsys, str(run), "--repository", str(models)) == (
        2,
        f"smartmixed-export: error: {run / 'model.json'}: preprocessing offset holds 1 NaN "
        "value; preprocessing scale holds 1 inf value\n",
    )
    assert not models.exists()
    assert torch.isfinite(weights["layers.1.weight"]).all()  # the fixture's run is untouched


def test_verify_only_checks_the_config_and_names_nan(entry: Path, tmp_path: Path, capsys) -> None:
    copy = Path(shutil.copytree(entry, tmp_path / "tiny"))
    config = copy / "config.pbtxt"
    text = config.read_text()
    config.write_text('name: "tiny"\nmax_batch_size: [\n')
    assert _export(capsys, "--verify-only", str(copy)) == (
        2,
        f"smartmixed-export: error: {config}:2:17: 'max_batch_size: [': Couldn't parse "
        "integer: [\n",
    )
    config.write_text(text.replace("dims: [ 64 ]", "dims: [ 63 ]"))
    code, err = _export(capsys, "--verify-only", str(copy))
    assert code == 2 and err == (
        f"smartmixed-export: error: {config}: input 'input': dims [63] do not match the ONNX "
        "model's [64], without the batch dimension (max_batch_size 1024)\n"
    )
    config.unlink()  # no config.pbtxt: allowed, as in Triton
    assert main(["--verify-only", str(copy)]) == 0
    capsys.readouterr()

    path = copy / "1" / "model.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("/W"))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[:2] = np.inf
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))
    assert main(["--verify-only", str(copy)]) == 1
    assert capsys.readouterr().err == (
        f"smartmixed-export: verification failed: ONNX model: initializer {weight.name} holds "
        "2 inf values\n"
    )


def test_a_symlinked_entry_is_refused_before_any_work(
    tiny_run: Path, entry: Path, tmp_path: Path, capsys
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(entry)  # an entry is replaced whole: the link, not its folder
    before = sorted(p.name for p in entry.rglob("*"))
    argv = [str(tiny_run), "--repository", str(models), "--version", "2"]
    assert _export(capsys, *argv) == (
        2,
        f"smartmixed-export: error: {models / 'tiny'} is a symbolic link (to {entry}); export "
        "replaces an entry folder as a whole: pass the --repository that holds the folder "
        "itself\n",
    )
    assert sorted(p.name for p in entry.rglob("*")) == before
    assert [p.name for p in models.iterdir()] == ["tiny"]


def _deep_spec(path: Path) -> None:
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == "smartmixed.spec")
    prop.value = "[" * 100_000 + "]" * 100_000
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda e: (e / "1" / "model.onnx").unlink() or os.mkfifo(e / "1" / "model.onnx"),
            "{e}/1/model.onnx: a FIFO, not a regular file",
        ),
        (
            lambda e: (e / "config.pbtxt").unlink() or os.mkfifo(e / "config.pbtxt"),
            "{e}/config.pbtxt: a FIFO, not a regular file",
        ),
        (
            lambda e: _deep_spec(e / "1" / "model.onnx"),
            "{e}/1/model.onnx: metadata smartmixed.spec: JSON nested deeper than 64 levels",
        ),
    ],
    ids=["model.onnx a FIFO", "config.pbtxt a FIFO", "spec metadata 10^5 deep"],
)
def test_verify_only_reads_a_tampered_entry_in_one_line(
    entry: Path, tmp_path: Path, capsys, tamper, message: str
) -> None:
    """--verify-only reads the entry as serve does: regular files only (a FIFO never hangs
    it), metadata of bounded depth (never a RecursionError)."""
    copy = Path(shutil.copytree(entry, tmp_path / "tiny"))
    tamper(copy)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in copy.rglob("*"))
    assert _export(capsys, "--verify-only", str(copy)) == (
        2,
        f"smartmixed-export: error: {message.format(e=copy)}\n",
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in copy.rglob("*")) == before


# --------------------------------------------------------------------------------------------
# --module FILE.py:FACTORY: a user's own network

USER_FILE = """
import torch
from torch import nn

from smartmixed.nn import MixedActivation

POOL = ["relu", "sigmoid", "tanh", "elu"]


def build(channels=4):
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        MixedActivation(channels, dim=1, pool=POOL),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 16, 10),
        MixedActivation(10, pool=POOL),
        nn.Linear(10, 3),
    )


def wide():
    return build(channels=5)


def broken():
    raise RuntimeError("no GPU here")


def not_a_module():
    return {"conv": 1}


NUMBER = 3
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(net.py holding the factories, net.safetensors: build()'s model frozen and saved)."""
    from smartmixed.nn import MixedActivation, freeze, save_frozen

    folder = tmp_path_factory.mktemp("user")
    source = folder / "net.py"
    source.write_text(USER_FILE)
    namespace: dict = {}
    exec(compile(USER_FILE, str(source), "exec"), namespace)  # the test's own copy of the model
    model = namespace["build"]()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MixedActivation):
                m.logits.copy_(torch.randn(m.logits.shape, generator=generator) * 3)
    save_frozen(freeze(model), folder / "net.safetensors")
    return source, folder / "net.safetensors"


def test_a_module_exports_from_the_command_line(
    user_module: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    source, weights = user_module
    argv = [
        "--module", f"{source}:build", "--weights", str(weights), "--input-shape", "1,8,8",
        "--repository", str(tmp_path), "--labels", "cat,dog,fish", "--lowering", "permuted",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == f"exported {source}:build -> {tmp_path / 'net'}/1/model.onnx (lowering permuted, fp32)"
    )
    assert out[1] == "frozen layers (permuted chosen):"
    assert out[2].startswith("  permuted: 2: 4 features, ") and out[2].endswith(
        ": permuted (through 0 > 1 > 3 > 5), after maxpool 3 (monotone)"
    )
    assert out[3].startswith("  permuted: 6: 10 features, ")
    assert out[3].endswith(": permuted (through 5 > 7)")
    assert [line.split(":")[0] for line in out[4:6]] == ["  folded", "  folded"]
    assert out[6] == "verified against PyTorch (no test inputs given; random and edge inputs only):"
    config = (tmp_path / "net" / "config.pbtxt").read_text()
    assert "dims: [ 1, 8, 8 ]" in config
    spec = json.loads(
        next(
            p.value
            for p in onnx.load(str(tmp_path / "net" / "1" / "model.onnx")).metadata_props
            if p.key == "smartmixed.spec"
        )
    )
    assert spec["labels"] == ["cat", "dog", "fish"] and spec["arch"] == [64, 4, 10, 3]
    # the entry names no run: --verify-only says why it cannot re-verify
    assert _export(capsys, "--verify-only", str(tmp_path / "net")) == (
        2,
        f"smartmixed-export: error: {tmp_path / 'net' / '1' / 'model.onnx'}: exported from a "
        "module, not a run: nothing to verify it against (it was verified when exported)\n",
    )


def test_bad_module_options_are_refused_in_one_line(
    user_module: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    source, weights = user_module
    other = tmp_path / "net.txt"
    other.write_text("")
    raising = tmp_path / "raising.py"
    raising.write_text("import torch\nraise ImportError('needs a newer torchvision')\n")
    models = tmp_path / "models"
    cases = {
        (f"{tmp_path}/nope.py:build", str(weights), "1,8,8"): (
            f"--module {tmp_path}/nope.py:build: {tmp_path}/nope.py: no such file"
        ),
        (f"{other}:build", str(weights), "1,8,8"): (
            f"--module {other}:build: {other} is not a Python file (.py)"
        ),
        (str(source), str(weights), "1,8,8"): (
            f"--module {str(source)!r}: expected FILE.py:FACTORY, e.g. net.py:build"
        ),
        (f"{raising}:build", str(weights), "1,8,8"): (
            f"--module {raising}:build: importing {raising} raised ImportError: needs a newer "
            "torchvision"
        ),
        (f"{source}:nothing", str(weights), "1,8,8"): (
            f"--module {source}:nothing: {source} defines no nothing"
        ),
        (f"{source}:NUMBER", str(weights), "1,8,8"): (
            f"--module {source}:NUMBER: NUMBER is not a function or class (a int)"
        ),
        (f"{source}:broken", str(weights), "1,8,8"): (
            f"--module {source}:broken: broken() raised RuntimeError: no GPU here"
        ),
        (f"{source}:not_a_module", str(weights), "1,8,8"): (
            f"--module {source}:not_a_module: not_a_module() returned a dict, expected a "
            "torch.nn.Module"
        ),
        (f"{source}:build", str(tmp_path / "none.safetensors"), "1,8,8"): (
            f"--weights {tmp_path / 'none.safetensors'}: no such file"
        ),
        (f"{source}:wide", str(weights), "1,8,8"): (
            f"{weights.with_suffix('.json')}: layer '2': 4 features saved, the model's layer has 5"
        ),
        (f"{source}:build", str(weights), "1,x,8"): (
            "--input-shape '1,x,8': expected positive integers separated by commas, e.g. 1,28,28"
        ),
        (f"{source}:build", str(weights), "0,8,8"): (
            "--input-shape '0,8,8': expected positive integers separated by commas, e.g. 1,28,28"
        ),
        (f"{source}:build", str(weights), "1,12,12"): (
            "the model fails on an input of shape [2, 1, 12, 12] (RuntimeError: mat1 and mat2 "
            "shapes cannot be multiplied (2x144 and 64x10))"
        ),
        (f"{source}:build", str(weights), "2,8,8"): (
            "the model fails on an input of shape [2, 2, 8, 8] (RuntimeError: Given groups=1, "
            "weight of size [4, 1, 3, 3], expected input[2, 2, 8, 8] to have 1 channels, but got "
            "2 channels instead)"
        ),
    }
    for (module, weights_file, shape), message in cases.items():
        argv = ["--module", module, "--weights", weights_file, "--input-shape", shape]
        assert _export(capsys, *argv, "--repository", str(models)) == (
            2,
            f"smartmixed-export: error: {message}\n",
        ), module
        assert not models.exists()
