"""smartmixed.bench: what the activation mix costs (training steps, ONNX Runtime latency, HTTP)
and how the service holds up (soak).

A bench's options are a dataclass whose fields carry the help of their flags
(``flag("...", default=...)``): ``add_options`` writes one flag per field into
the bench's subcommand, so every default is written once.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable
from dataclasses import field, fields
from typing import Any

from smartmixed import contract

PAPER_ARCH = tuple(contract.PRESETS["paper"])  # the default network of every bench
PRESET_INPUT_SHAPE = (1, 28, 28)  # (C, H, W): the conv presets are laid out for 28x28 grey images


class BenchError(ValueError):
    """A bench option that cannot be used; the CLI prints it and exits with status 2."""


def parse_positive_ints(text: str | Iterable[int], what: str) -> list[int]:
    """contract.parse_positive_ints, its error a BenchError."""
    try:
        return contract.parse_positive_ints(text, what)
    except ValueError as e:
        raise BenchError(str(e)) from None


def flag(
    help: str, choices: Iterable[str] | None = None, group: str | None = None, **kw: Any
) -> Any:
    """An options field (``kw``: dataclasses.field's, its default) whose flag add_options
    writes: its help, its choices, the mutually exclusive group it belongs to."""
    metadata = {"help": help, "choices": list(choices) if choices else None, "group": group}
    return field(metadata=metadata, **kw)


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """One flag per field of the dataclass ``options``, in field order: --NAME (the field's name
    less a trailing ``_s``, dashed; its last word the metavar), the field's type (a bool: a
    switch) and default, its metadata's help (the default appended), choices and group. The
    parsed values go to ``options`` through contract.call_with_options."""
    hints = typing.get_type_hints(options)
    groups: dict[str, Any] = {}
    for f in fields(options):
        name, text = "--" + f.name.removesuffix("_s").replace("_", "-"), f.metadata["help"]
        if (group := f.metadata.get("group")) is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        hint = hints[f.name]  # X | None: X
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if kind is bool:
            target.add_argument(name, dest=f.name, action="store_true", help=text)
            continue
        if f.default is not None:
            text += f" (default {format(f.default, 'g') if kind is float else f.default})"
        more = (
            {"choices": choices}
            if (choices := f.metadata.get("choices"))
            else {"metavar": name.split("-")[-1].upper()}
        )
        target.add_argument(name, dest=f.name, type=kind, default=f.default, help=text, **more)
