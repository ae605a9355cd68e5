"""Print each pilot study's models per architecture: mean validation and test accuracy and the
mean paired difference to fixed ReLU (same seeds), with seed 101's layer-1 mix where its run
folder is still at hand. Usage: python summarise.py s1.json [REFERENCE_MODEL]"""

import collections
import json
import statistics as st
import sys
from pathlib import Path

cells = json.loads(Path(sys.argv[1]).read_text())["cells"]
ref = sys.argv[2] if len(sys.argv) > 2 else "relu"
by = collections.defaultdict(dict)
for c in cells:
    by[(c["archkey"], c["model"])][c["seed"]] = c
for arch in sorted({a for a, _ in by}):
    print("##", arch)
    r = by.get((arch, ref), {})
    for model in sorted({m for a, m in by if a == arch}):
        d = by[(arch, model)]
        common = sorted(set(d) & set(r))
        dv = [d[s]["val_accuracy"] - r[s]["val_accuracy"] for s in common] or [0.0]
        dt = [d[s]["test_accuracy"] - r[s]["test_accuracy"] for s in common] or [0.0]
        mix = ""
        spec_path = Path(min(d.items())[1]["run"]) / "model.json"
        if spec_path.exists():
            spec = json.loads(spec_path.read_text())
            if spec["mode"] == "smartmixed":
                counts = collections.Counter(spec["assignment"][0])
                n = sum(counts.values())
                mix = ", ".join(f"{k} {100 * v // n}%" for k, v in counts.most_common(3))
        val = st.mean(c["val_accuracy"] for c in d.values())
        test = st.mean(c["test_accuracy"] for c in d.values())
        print(
            f"{model:>14} n={len(d)} val {val:.4f} test {test:.4f}  "
            f"d_val {st.mean(dv):+.4f} d_test {st.mean(dt):+.4f}  {mix}"
        )
