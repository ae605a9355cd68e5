"""smartmixed.bench: what the activation mix costs (training steps, ONNX Runtime latency, HTTP)
and how the service holds up (soak).

A bench's options are a dataclass whose fields carry the help of their flags
(``field(default=..., metadata={"help": ...})``): ``add_options`` writes one flag per field into
the bench's subcommand, so every default is written once.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from smartmixed import contract


class BenchError(ValueError):
    """A bench option that cannot be used; the CLI prints it and exits with status 2."""


def parse_positive_ints(text: str | Iterable[int], what: str) -> list[int]:
    """contract.parse_positive_ints, its error a BenchError."""
    try:
        return contract.parse_positive_ints(text, what)
    except ValueError as e:
        raise BenchError(str(e)) from None


def add_options(
    parser: argparse.ArgumentParser, options: type, *, helps: Mapping[str, str] | None = None
) -> None:
    """One flag per field of the dataclass ``options``, in field order: --NAME (the field's name
    less a trailing ``_s``, dashed; its last word the metavar), the field's type (a bool: a
    switch) and default, and the field's metadata: ``help`` (else ``helps[name]``; the default is
    appended), optionally ``flag`` (another name), ``choices``, ``group`` (a mutually exclusive
    group of that name). The parsed values go to ``options`` through call_with_options."""
    hints = typing.get_type_hints(options)
    groups: dict[str, Any] = {}
    for f in fields(options):
        meta = dict(f.metadata)
        text = meta.pop("help", None) or (helps or {})[f.name]
        flag = meta.pop("flag", "--" + f.name.removesuffix("_s").replace("_", "-"))
        group = meta.pop("group", None)
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        parser_or_group = parser if group is None else groups[group]
        # X | None: X
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), None)
        kind = kind or hints[f.name]
        if kind is bool:
            parser_or_group.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        if f.default is not None:
            text += f" (default {format(f.default, 'g') if kind is float else f.default})"
        if "choices" not in meta:
            meta["metavar"] = flag.rsplit("-", 1)[-1].upper()
        parser_or_group.add_argument(
            flag, dest=f.name, type=kind, default=f.default, help=text, **meta
        )
