"""A selection search's table, on validation only: per SmartMixed variant, its mean validation
accuracy per architecture and its paired validation difference against fixed baselines over
the (architecture, seed) pairs both trained (chosen cells only; test accuracy takes no part).

    python results/verdict-2026-12/search.py results/verdict-2026-12/selection-search-2/study.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smartmixed.nn.pool import ACTIVATIONS

BASELINES = ("relu", "leaky_relu")


def search_rows(study: dict, baselines: tuple[str, ...] = BASELINES) -> list[dict]:
    cells = [c for c in study["cells"] if c.get("chosen", True)]
    val = {(c["archkey"], c["model"], c["seed"]): c["val_accuracy"] for c in cells}
    archs = list(dict.fromkeys(c["archkey"] for c in cells))
    models = list(dict.fromkeys(c["model"] for c in cells))
    rows = []
    for model in models:
        row: dict = {"model": model, "mean": {}, "paired": {}}
        for arch in archs:
            own = [v for (a, m, _), v in val.items() if (a, m) == (arch, model)]
            row["mean"][arch] = sum(own) / len(own) if own else None
        for base in baselines:
            diffs = [
                v - val[a, base, s]
                for (a, m, s), v in val.items()
                if m == model and (a, base, s) in val
            ]
            row["paired"][base] = (sum(diffs) / len(diffs), len(diffs)) if diffs else None
        rows.append(row)
    # the mix's variants first, best paired difference against the first baseline on top
    first = baselines[0]
    return sorted(
        rows,
        key=lambda r: (
            r["model"] in ACTIVATIONS,
            -(r["paired"][first][0] if r["paired"][first] else float("-inf")),
        ),
    )


def render(rows: list[dict], baselines: tuple[str, ...] = BASELINES) -> str:
    archs = list(rows[0]["mean"]) if rows else []
    head = ["model", *(f"val {a}" for a in archs), *(f"vs {b}, points (pairs)" for b in baselines)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        means = [f"{r['mean'][a]:.4f}" if r["mean"][a] is not None else "-" for a in archs]
        paired = [
            f"{100 * p[0]:+.2f} ({p[1]})" if p else "-" for p in (r["paired"][b] for b in baselines)
        ]
        lines.append("| " + " | ".join([r["model"], *means, *paired]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}\n\n{render(search_rows(json.loads(Path(path).read_text())))}\n")
