"""Exports that race, are killed half-way, or do not fit the entry they are written into.

A kill is simulated in a forked child that SIGKILLs itself just before one of the calls that
change the file system (rename, link, mkdir, chmod, unlink, ...), each in turn: at every one of
those points the repository must load in the server with the entry whole, old or new.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import signal
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from smartmixed.contract import ModelSpec
from smartmixed.export import entry as entry_module
from smartmixed.export import repository
from smartmixed.export.cli import main
from smartmixed.serve.models import load_repository
from smartmixed.train.artifacts import save_model
from smartmixed.train.model import MixedMLP

# the os functions through which an export changes the file system (pathlib, shutil and
# tempfile call them too); the exchange of two folders happens between two of them
CHANGES = ("rename", "replace", "link", "symlink", "mkdir", "rmdir", "unlink", "remove", "chmod")
MAX_STEPS = 400  # a bound on the kill points tried: an export makes a few dozen changes


def _untrained_run(folder: Path, arch: list[int]) -> Path:
    """A run of random ReLU weights (no data request: verified on random and edge inputs)."""
    spec = ModelSpec.untrained(
        arch=arch, pool=["relu"], assignment=[["relu"] * w for w in arch[1:-1]]
    )
    folder.mkdir(parents=True)
    save_model(folder, spec, MixedMLP.from_spec(spec).canonical_state_dict())
    return folder


def _export(run: Path, models: Path, *options: str) -> None:
    """Export ``run`` as the entry "tiny" (permuted lowering unless ``options`` name one)."""
    lowering = [] if "--lowering" in options else ["--lowering", "permuted"]
    assert main([str(run), "--repository", str(models), "--name", "tiny", *options, *lowering]) == 0


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (None for a folder) with its content."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def _hidden(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def _serves(models: Path) -> dict[str, list[str]]:
    """The versions the server loads, by model (it refuses a broken entry: LoadError)."""
    loaded = load_repository(models, device="cpu", threads=1, skip_bad_models=False)
    return {name: sorted(versions) for name, versions in loaded.models.items()}


def _arm_kill(step: int) -> None:
    """(In a forked child) SIGKILL this process just before its ``step``-th change to the file
    system: no finally block, no cleanup runs. The one change made otherwise, the exchange of
    two folders (a ctypes call), lies between two of these, so both of its sides are seen."""
    calls = itertools.count()

    def killing(real: Callable) -> Callable:
        def change(*args, **kwargs):
            if next(calls) == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return change

    for name in CHANGES:
        setattr(os, name, killing(getattr(os, name)))


def _kill_at_every_step(write: Callable[[], None], models: Path, after_kill) -> int:
    """Run ``write`` in a forked child killed at kill point 0, 1, 2, ... until one run finishes
    (its result stays in ``models``); ``after_kill(step)`` inspects each killed state, then
    ``models`` is put back as it was. Returns the number of kill points."""
    before = models.parent / f"{models.name}-before"
    shutil.copytree(models, before, symlinks=True)
    for step in range(MAX_STEPS):
        pid = os.fork()
        if pid == 0:  # the child: no exception may reach pytest's machinery
            code = 3
            try:
                _arm_kill(step)
                write()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"the export failed at kill point {step}"
            return step
        assert os.WTERMSIG(status) == signal.SIGKILL
        after_kill(step)
        shutil.rmtree(models)
        shutil.copytree(before, models, symlinks=True)
    raise AssertionError(f"the export still ran after {MAX_STEPS} kill points")


def _kill_while_writing(monkeypatch, after_kill) -> list[int]:
    """Make export_run's write of the entry run through ``_kill_at_every_step`` (lowering and
    verification run once, in this process). Returns [kill points tried] once it has run."""
    real_write = repository.write_entry
    steps = []

    def write_entry(entry: Path, *args, **kwargs) -> None:
        steps.append(
            _kill_at_every_step(
                lambda: real_write(entry, *args, **kwargs), entry.parent, after_kill
            )
        )

    monkeypatch.setattr(repository, "write_entry", write_entry)
    return steps


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == entry_module.__name__]


def test_two_exports_at_once_without_overwrite_one_wins_the_other_says_so(
    tiny_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    models = tmp_path / "models"
    together = threading.Barrier(2, timeout=60)
    real_load_model = repository.load_model

    def load_model_together(run: Path):
        together.wait()  # both have found version 1 free, neither has written it
        return real_load_model(run)

    monkeypatch.setattr(repository, "load_model", load_model_together)
    codes = []

    def export(lowering: str) -> None:
        codes.append(main([str(tiny_run), "--repository", str(models), "--lowering", lowering]))

    threads = [
        threading.Thread(target=export, args=(low,), daemon=True) for low in ("permuted", "scatter")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(codes) == [0, 2]
    out, err = capsys.readouterr()
    assert err == (
        f"smartmixed-export: error: {models / 'tiny' / '1'} was written by another export while "
        "this one ran; pass --overwrite to replace it\n"
    )
    (winner,) = re.findall(r"^exported .* \(lowering (\w+), fp32\)$", out, re.MULTILINE)
    assert json.loads((models / "tiny" / "1" / "export.json").read_text())["lowering"] == winner
    assert _serves(models) == {"tiny": ["1"]}
    assert _hidden(models) == [".tiny.lock"]


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        # replace the only version by a network of 3 classes: version and config change together
        ([64, 8, 3], ["--version", "1", "--overwrite"]),
        # add version 2 (another lowering, so another config.pbtxt) beside version 1
        (None, ["--version", "2", "--lowering", "scatter"]),
    ],
    ids=["overwrite", "add-version"],
)
def test_a_kill_at_any_point_leaves_the_old_or_the_new_entry_servable(
    arch: list[int] | None, options: list[str], tiny_run: Path, tmp_path: Path, monkeypatch
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    old = _tree(models / "tiny")
    killed: dict[int, dict] = {}

    def after_kill(step: int) -> None:
        assert _serves(models) in ({"tiny": ["1"]}, {"tiny": ["2"]})
        killed[step] = _tree(models / "tiny")

    steps = _kill_while_writing(monkeypatch, after_kill)
    run = tiny_run if arch is None else _untrained_run(tmp_path / "other", arch)
    _export(run, models, *options)
    new = _tree(models / "tiny")
    assert steps == [len(killed)] and new != old
    assert [step for step, tree in killed.items() if tree not in (old, new)] == []
    assert old in killed.values() and new in killed.values()  # killed before and after the swap
    assert _hidden(models) == [".tiny.lock"]


def test_without_an_atomic_swap_the_next_export_restores_a_killed_one(
    tiny_run: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    old = _tree(models / "tiny")
    monkeypatch.setattr(entry_module, "exchange", lambda a, b: False)  # as on NFS, or macOS
    caplog.set_level(logging.WARNING, logger=entry_module.__name__)
    recovered: dict[int, dict] = {}
    restored = []

    def after_kill(step: int) -> None:
        caplog.clear()
        with entry_module.entry_lock(models / "tiny", file_mode=0o644):
            entry_module.remove_leftovers(models / "tiny")  # what the next export does first
        assert _serves(models) == {"tiny": ["1"]} and _hidden(models) == [".tiny.lock"]
        recovered[step] = _tree(models / "tiny")
        restored.extend(m for m in _warnings(caplog) if "restored" in m)

    real_write = repository.write_entry
    steps = _kill_while_writing(monkeypatch, after_kill)
    _export(tiny_run, models, "--overwrite", "--lowering", "scatter")
    new = _tree(models / "tiny")
    # the warning, from an export of this process (the ones above ran in killed children)
    monkeypatch.setattr(repository, "write_entry", real_write)
    caplog.clear()
    _export(tiny_run, models, "--overwrite", "--lowering", "scatter")
    assert _warnings(caplog) == [
        f"{models / 'tiny'}: this file system cannot swap two folders in one step; replacing the "
        "entry by two renames (an export killed between them leaves it in "
        f"{models / '.tiny.replaced'}, and the next export restores it)"
    ]
    assert steps == [len(recovered)] and new != old
    assert [step for step, tree in recovered.items() if tree not in (old, new)] == []
    assert old in recovered.values() and new in recovered.values()
    # killed between the two renames: the entry was missing until the old one was put back
    assert restored and set(restored) == {
        f"{models / 'tiny'}: restored the entry an interrupted export had moved to "
        f"{models / '.tiny.replaced'}"
    }
    assert _hidden(models) == [".tiny.lock"]


@pytest.mark.parametrize(
    ("arch", "options", "interface", "others"),
    [
        ([64, 8, 3], ["--version", "3"], "input [64] -> logits [3], probabilities [3]", "s 1, 2"),
        (
            [16, 8, 10],
            ["--version", "3"],
            "input [16] -> logits [10], probabilities [10]",
            "s 1, 2",
        ),
        # replacing version 1 by another network, while version 2 stays
        (
            [64, 8, 3],
            ["--version", "1", "--overwrite"],
            "input [64] -> logits [3], probabilities [3]",
            " 2",
        ),
    ],
    ids=["classes", "input-width", "overwrite-beside-another"],
)
def test_a_version_of_another_architecture_is_refused_and_nothing_changes(
    arch: list[int],
    options: list[str],
    interface: str,
    others: str,
    tiny_run: Path,
    tmp_path: Path,
    capsys,
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    _export(tiny_run, models, "--version", "2")
    before = _tree(models)
    other = _untrained_run(tmp_path / "other", arch)
    argv = [str(other), "--repository", str(models), "--name", "tiny", *options]
    assert main([*argv, "--lowering", "permuted"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-export: error: {other} ({interface}) does not fit {models / 'tiny'} "
        f"(input [64] -> logits [10], probabilities [10] in its config.pbtxt, version{others}): "
        "the versions of an entry share their inputs and outputs; export it under another --name\n"
    )
    assert _tree(models) == before
    assert _serves(models) == {"tiny": ["2"]}


def test_leftovers_of_killed_exports_are_removed_at_the_next_export(
    tiny_run: Path, tmp_path: Path, caplog
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    stale = [models / ".tiny.k3_x9a0q.tmp", models / ".tiny.0123abcd.tmp"]
    for folder in stale:  # a half-built entry, or an old one swapped out
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(b"partial")
    # the staging folders of other entries (named tiny-int8 and tiny.x) are not this entry's
    others = [models / ".tiny-int8.0123abcd.tmp", models / ".tiny.x.0123abcd.tmp"]
    for folder in others:
        folder.mkdir()
    caplog.set_level(logging.WARNING, logger=entry_module.__name__)
    _export(tiny_run, models, "--version", "2")
    assert _warnings(caplog) == [
        f"removed {folder}: the staging folder of an interrupted export" for folder in sorted(stale)
    ]
    assert _hidden(models) == sorted([".tiny.lock", *(p.name for p in others)])
    assert _serves(models) == {"tiny": ["2"]}


def test_an_entry_without_config_pbtxt_is_checked_against_its_models(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    (models / "tiny" / "config.pbtxt").unlink()  # allowed, as in Triton
    before = _tree(models)
    other = _untrained_run(tmp_path / "other", [64, 8, 3])
    argv = [str(other), "--repository", str(models), "--name", "tiny", "--version", "2"]
    assert main([*argv, "--lowering", "permuted"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-export: error: {other} does not fit {models / 'tiny'}, which has no usable "
        "config.pbtxt: the one of its new version would not describe "
        f"{models / 'tiny' / '1' / 'model.onnx'} (config.pbtxt: output 'logits': dims [3] do not "
        "match the ONNX model's [10], without the batch dimension (max_batch_size 1024); output "
        "'probabilities': dims [3] do not match the ONNX model's [10], without the batch "
        "dimension (max_batch_size 1024)); export it under another --name\n"
    )
    assert _tree(models) == before
    _export(tiny_run, models, "--version", "2")  # the same inputs and outputs: it fits
    assert (models / "tiny" / "config.pbtxt").is_file()
    assert _serves(models) == {"tiny": ["2"]}


def test_an_export_waits_for_the_lock_then_gives_up_in_one_line(
    tiny_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    models = tmp_path / "models"
    _export(tiny_run, models)
    before = _tree(models)
    monkeypatch.setattr(entry_module, "LOCK_TIMEOUT_S", 0.2)
    lock = models / ".tiny.lock"
    with lock.open() as held:  # another export writing the entry, stuck
        fcntl.flock(held, fcntl.LOCK_EX)
        argv = [str(tiny_run), "--repository", str(models), "--version", "2"]
        assert main([*argv, "--lowering", "permuted"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-export: error: {models / 'tiny'}: another export has been writing it for "
        f"over 0.2 s (it holds {lock}); try again once it has finished\n"
    )
    assert _tree(models) == before
