"""smartmixed-bench's flags: generated from a bench's options dataclass (bench.add_options), and
every bench through the one runner (bad options: one line, exit 2, nothing written)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smartmixed.bench import add_options, flag
from smartmixed.bench.cli import main
from smartmixed.contract import call_with_options


@dataclass
class Toy:
    span_s: int = flag("seconds", default=3)
    rate: float = flag("a rate", default=0.5)
    mode: str = flag("which", ("a", "b"), default="a")
    left: str | None = flag("one side", group="side", default=None)
    right: Path | None = flag("the other side", group="side", default=None)  # noqa: RUF009
    plain: int = field(default=1, metadata={"help": "help alone"})  # no choices, no group
    loud: bool = flag("say more", default=False)


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, Toy)
    return parser


def test_one_flag_per_field_with_its_default_in_the_help() -> None:
    actions = {a.dest: a for a in toy_parser()._actions}
    rows = {
        dest: (a.option_strings, a.metavar, a.type, a.default, a.choices, a.help)
        for dest, a in actions.items()
        if dest != "help"
    }
    assert rows == {
        "span_s": (["--span"], "SPAN", int, 3, None, "seconds (default 3)"),
        "rate": (["--rate"], "RATE", float, 0.5, None, "a rate (default 0.5)"),
        "mode": (["--mode"], None, str, "a", ["a", "b"], "which (default a)"),
        "left": (["--left"], "LEFT", str, None, None, "one side"),
        "right": (["--right"], "RIGHT", Path, None, None, "the other side"),
        "loud": (["--loud"], None, None, False, None, "say more"),
        "plain": (["--plain"], "PLAIN", int, 1, None, "help alone (default 1)"),
    }


def test_parsed_flags_make_the_options() -> None:
    args = toy_parser().parse_args(["--span", "4", "--right", "r", "--loud"])
    assert call_with_options(Toy, args) == Toy(span_s=4, right=Path("r"), loud=True)
    assert call_with_options(Toy, toy_parser().parse_args([])) == Toy()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--left", "l", "--right", "r"], "argument --right: not allowed with argument --left"),
        (["--mode", "c"], "argument --mode: invalid choice: 'c'"),
        (["--span", "1.5"], "argument --span: invalid int value: '1.5'"),
    ],
)
def test_bad_flags_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        toy_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-cost", "http", "latency", "soak"])
def test_an_out_that_is_a_file_is_refused_by_every_bench(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    assert main([command, "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-bench: error: --out {out} exists and is not a folder\n"
    )
    assert out.read_text() == "x"
