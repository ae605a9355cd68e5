"""train/report.py: the plots and report.md of a finished run, apart from the artifacts' I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smartmixed import contract
from smartmixed.train import report


def _run_python(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_run_files_load_no_matplotlib() -> None:
    # everything that only reads or writes a run (export, the benches) draws nothing
    _run_python("import sys, smartmixed.train.artifacts\nassert 'matplotlib' not in sys.modules\n")


def test_bench_outputs_are_written_without_torch(tmp_path: Path) -> None:
    # write_outputs writes through contract.files: no torch to write a JSON and a Markdown file
    _run_python(
        "import sys, pathlib\n"
        "from smartmixed.contract.outputs import write_outputs\n"
        f"out = pathlib.Path({str(tmp_path)!r})\n"
        "write_outputs({'x': 1}, out, 'b', render=lambda r: '# b\\n',\n"
        "              draw=lambda r, p: p.write_bytes(b'png'))\n"
        "loaded = [m for m in ('torch', 'safetensors', 'matplotlib') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md", "b.png"]
    assert (tmp_path / "b.json").read_text() == '{\n "x": 1\n}\n'


def _fixed_run() -> tuple[contract.ModelSpec, list[dict]]:
    spec = contract.ModelSpec(
        arch=[4, 3, 2, 2],
        pool=["relu", "tanh"],
        mode="fixed:relu",
        assignment=[["relu"] * 3, ["relu", "tanh"]],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[4],
        labels=["a", "b"],
        training={"data_summary": "toy"},
        metrics={
            "test_accuracy": 0.75,
            "test_loss": 0.5,
            "val_accuracy": 0.8,
            "best_epoch": 1,
            "train_seconds": 2.25,
        },
    )
    history = [
        {
            "epoch": e,
            "phase": "fixed",
            "train_loss": 1.0 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "train_accuracy": 0.5 + 0.1 * e,
            "val_accuracy": 0.5 + 0.1 * e,
        }
        for e in range(3)
    ]
    return spec, history


def test_fixed_run_gets_its_two_plots_and_a_report_linking_only_them(tmp_path: Path) -> None:
    spec, history = _fixed_run()
    run = tmp_path / "toy-run"
    run.mkdir()
    report.write_plots_and_report(run, spec, history)
    # no phase-1 rows: neither the selection nor the logit-gradient plot is drawn
    assert sorted(p.name for p in run.iterdir()) == ["activations.png", "curves.png", "report.md"]
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (run / report.REPORT).read_text() == (
        "# Run toy-run\n"
        "\n"
        "- mode: `fixed:relu`, architecture [4, 3, 2, 2], pool relu, tanh\n"
        "- data: toy\n"
        "- test accuracy **0.7500** (loss 0.5000); validation accuracy 0.8000 at epoch 1\n"
        "- training time 2.2 s over 3 epochs\n"
        "\n"
        "## Activation mix per hidden layer\n"
        "\n"
        "| layer | width | mix |\n"
        "|---|---|---|\n"
        "| 1 | 3 | relu 100% |\n"
        "| 2 | 2 | relu 50%, tanh 50% |\n"
        "\n"
        "## Plots\n"
        "\n"
        "![curves](curves.png)\n"
        "![activations](activations.png)\n"
    )
