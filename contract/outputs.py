"""What every measurement shares (the benches and the training study): the machine a result was
measured on, percentiles, how its files are written, and the plotting backend.

Torch-free, so that the HTTP and soak benches (which drive a server in another process) load no
torch to describe the machine or write their outputs.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from smartmixed.contract import package_version
from smartmixed.contract.files import atomic_write_text


def machine_info() -> dict[str, Any]:
    """Platform, processor, cores, Python and torch versions (torch read from its install
    metadata, the same string as ``torch.__version__``, without importing it)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
    }


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """The ``qs`` percentiles (0 to 100) of ``values``, interpolated linearly between the closest
    ranks: numpy's default method, and statistics.quantiles' "inclusive" one. ValueError when
    ``values`` is empty."""
    data = sorted(values)
    if not data:
        raise ValueError("percentiles of no values")
    last = len(data) - 1
    result = []
    for q in qs:
        position = last * q / 100
        low = math.floor(position)
        high = min(low + 1, last)
        result.append(data[low] + (data[high] - data[low]) * (position - low))
    return result


def write_outputs(
    result: dict[str, Any],
    out: Path,
    name: str,
    *,
    render: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], Path], None],
) -> list[Path]:
    """DIR/NAME.json, .md (``render``), .png (``draw``), each written to a temporary name and
    renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    atomic_write_text(paths[0], json.dumps(result, indent=1) + "\n")
    atomic_write_text(paths[1], render(result))
    tmp = out / f".{name}.tmp.png"
    draw(result, tmp)
    tmp.replace(paths[2])
    return paths


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: the header, its separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display), imported when a bench first
    draws: a bench that only measures loads no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
    """Lay ``fig`` out, write it to ``path`` as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
