"""pilot-phase2.png: the two findings of the selection pilot of 2026-11-26, from s1-s5.json (validation
accuracy minus fixed ReLU's, mean over seeds 101-104, paired). Usage: python plot.py"""

import json
import statistics as st
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(__file__).parent
cells = []
for name in ("s1", "s2", "s3", "s4", "s5"):
    for c in json.loads((here / f"{name}.json").read_text())["cells"]:
        cells.append({**c, "file": name})


def d_val(arch: str, model: str, file: str) -> float:
    pick = {
        c["seed"]: c for c in cells if (c["archkey"], c["model"], c["file"]) == (arch, model, file)
    }
    ref = {
        c["seed"]: c for c in cells if (c["archkey"], c["model"], c["file"]) == (arch, "relu", file)
    }
    return st.mean(pick[s]["val_accuracy"] - ref[s]["val_accuracy"] for s in pick)


fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
rows = [  # (label, model, file) on [784, 512, 10]
    ("fixed tanh", "tanh", "s1"),
    ("SmartMixed, pool relu", "sm-relu", "s2"),
    ("SmartMixed, pool relu,tanh", "sm-rt", "s2"),
    ("  the same mix, phase 2 fresh", "sm-rt-fresh", "s3"),
    ("SmartMixed, six (continue)", "smartmixed", "s1"),
    ("  the same, phase 2 fresh", "sm-fresh", "s3"),
]
values = [1000 * d_val("table1-1", m, f) for _, m, f in rows]
left.barh(range(len(rows)), values, color=["grey", "C0", "C3", "C2", "C3", "C2"])
left.set_yticks(range(len(rows)), [r[0] for r in rows])
left.invert_yaxis()
left.axvline(0, color="black", lw=0.8)
left.set_xlabel("validation accuracy - fixed ReLU (x 1e-3)")
left.set_title("[784, 512, 10]: the loss is the path, not the choice")

archs = [
    ("table1-1", "[784, 512, 10]"),
    ("table1-5", "[784, 256,\n128, 10]"),
    ("784-256-128-64-10", "[784, 256,\n128, 64, 10]"),
    ("paper", "paper"),
]
variants = [
    (
        "phase 2 continued (old default)",
        "smartmixed",
        {"table1-1": "s1", "table1-5": "s4", "784-256-128-64-10": "s4", "paper": "s4"},
    ),
    (
        "phase 2 fresh (new default)",
        "sm-fresh",
        {"table1-1": "s3", "table1-5": "s4", "784-256-128-64-10": "s4", "paper": "s4"},
    ),
    (
        "fresh + logit warm-up 0.5",
        "sm-fresh-w10",
        {"table1-1": "s5", "table1-5": "s4", "784-256-128-64-10": "s4", "paper": "s4"},
    ),
]
width = 0.27
for k, (label, model, files) in enumerate(variants):
    ys = [1000 * d_val(a, model, files[a]) for a, _ in archs]
    right.bar([i + (k - 1) * width for i in range(len(archs))], ys, width, label=label)
right.set_xticks(range(len(archs)), [n for _, n in archs])
right.axhline(0, color="black", lw=0.8)
right.set_ylabel("validation accuracy - fixed ReLU (x 1e-3)")
right.set_title("four architectures, seeds 101-104")
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "pilot-phase2.png", dpi=120)
print("wrote", here / "pilot-phase2.png")
