"""Per architecture: SmartMixed against the best fixed activation, paired, from a study.json.

    python results/verdict-2026-12/verdict.py results/verdict-2026-12/mnist-tuned/study.json
    python results/verdict-2026-12/verdict.py --mix sm-bilevel STUDY.json   # a variant instead

The best fixed activation of an architecture is the one with the highest mean test accuracy over
its chosen cells (the study's ranks); the paired difference SmartMixed - best over the seeds both
trained, with its Student-t 95% interval, says win (interval above 0), loss (below) or tie.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smartmixed.nn.pool import ACTIVATIONS
from smartmixed.train.study import summarize

MIX = "smartmixed"


def verdicts(study: dict, mix: str = MIX) -> list[dict]:
    cells = [c for c in study["cells"] if c.get("chosen", True)]
    rows = []
    for arch, per_model in study["summary"].items():
        fixed = {m: s for m, s in per_model.items() if m in ACTIVATIONS}
        if mix not in per_model or not fixed:
            continue
        best = max(fixed, key=lambda m: fixed[m]["mean"])
        test = {(c["model"], c["seed"]): c["test_accuracy"] for c in cells if c["archkey"] == arch}
        diffs = [test[mix, s] - test[best, s] for (m, s) in test if m == mix and (best, s) in test]
        paired = summarize(diffs)
        mean = paired["mean"]
        low, high = paired["ci95"] or (float("-inf"), float("inf"))
        rows.append(
            {
                "arch": arch,
                "mix": per_model[mix]["mean"],
                "best": best,
                "best_mean": fixed[best]["mean"],
                "n": len(diffs),
                "difference": [mean, low, high],
                "verdict": "win" if low > 0 else "loss" if high < 0 else "tie",
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| architecture | SmartMixed | best fixed | paired difference, points [95%] (n) | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mean, low, high = (100 * x for x in r["difference"])
        lines.append(
            f"| {r['arch']} | {r['mix']:.4f} | {r['best']} {r['best_mean']:.4f} | "
            f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] ({r['n']}) | {r['verdict']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    mix = MIX
    if args[:1] == ["--mix"]:
        mix, args = args[1], args[2:]
    for path in args:
        print(f"{path}\n\n{render(verdicts(json.loads(Path(path).read_text()), mix))}\n")
