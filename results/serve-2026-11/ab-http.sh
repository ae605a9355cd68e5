#!/bin/bash
# HTTP A/B: the service at commit OLD (default d4ad91f, before the service's HTTP limits and load
# shedding of 2026-11-25) against the working tree, both up at once on one repository, `wrk -t1`
# alternating between them in 8 pairs of 3 s runs, so both see the same noise on a shared machine.
# Prints one line per run: "old|new requests/s". Usage, from the repository root after `make venv`:
#   C=1 results/serve-2026-11/ab-http.sh            (C: concurrency; OLD=<commit>; N=pairs)
set -euo pipefail
C=${C:-1}; OLD=${OLD:-d4ad91f}; N=${N:-8}
PY=$PWD/.venv/bin/python
WORK=$(mktemp -d)
trap 'kill -TERM ${pids:-} 2>/dev/null || true; wait 2>/dev/null; git worktree remove --force "$WORK/old" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/old" "$OLD" >/dev/null 2>&1
mkdir -p "$WORK/pkg/smartmixed" && ln -s "$WORK/old/serve" "$WORK/pkg/smartmixed/serve"
# serve imports the contract stage (a package of its own since c0a16b0): the old one, if it has one
[ -d "$WORK/old/contract" ] && ln -s "$WORK/old/contract" "$WORK/pkg/smartmixed/contract"
cat > "$WORK/old_serve.py" <<PYEOF
import sys
# the editable install maps smartmixed.* to this checkout: drop its finders, import the old serve
sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path_hooks = [h for h in sys.path_hooks if "Editable" not in repr(h)]
sys.path_importer_cache.clear()
sys.path.insert(0, "$WORK/pkg")
import smartmixed.serve.cli as cli
assert cli.__file__.startswith("$WORK/pkg"), cli.__file__
sys.exit(cli.main(sys.argv[1:]))
PYEOF
$PY - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np, orjson
from smartmixed.bench.server import build_repository
from smartmixed.train.model import PRESETS
work = Path(sys.argv[1])
build_repository(work / "models", arch=PRESETS["paper"], seed=0)
x = np.random.default_rng(0).random(784).astype(np.float32)
body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
                                 "data": x.tolist()}]}).decode()
(work / "post.lua").write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\n'
                               'wrk.headers["Content-Type"] = "application/json"\n')
PYEOF
po=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
pn=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
$PY "$WORK/old_serve.py" --repository "$WORK/models" --port $po --log-level warning >/dev/null 2>&1 & pids=$!
$PY -m smartmixed.serve --repository "$WORK/models" --port $pn --log-level warning >/dev/null 2>&1 & pids="$pids $!"
for p in $po $pn; do for _ in $(seq 150); do curl -sf localhost:$p/v2/health/ready >/dev/null && break; sleep 0.2; done; done
for p in $po $pn; do wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:$p/v2/models/mixed/infer >/dev/null; done
for _ in $(seq $N); do
  for p in $po $pn; do
    name=$([ $p = $po ] && echo old || echo new)
    echo "$name $(wrk -t1 -c$C -d3s -s "$WORK/post.lua" http://127.0.0.1:$p/v2/models/mixed/infer | awk '/Requests\/sec/ {print $2}')"
  done
done
