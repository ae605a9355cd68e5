#!/bin/bash
# GPU checks for smartmixed (device machine). Everything it keeps goes to $OUT.
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/wheels/*.whl || exit 3
mkdir -p /tmp/pkg && ln -sfn "$ROOT" /tmp/pkg/smartmixed
export PYTHONPATH=/tmp/pkg:/tmp/site
nvidia-smi -L
python3 -c "import torch,onnxruntime as o;print('torch',torch.__version__,'cuda',torch.version.cuda,torch.cuda.get_device_name(0),'| ort',o.__version__,o.get_available_providers())"
echo "== 1. CUDA tests"
timeout 200 python3 -m pytest -q -ra -p no:cacheprovider tests/train/test_cuda.py tests/bench/test_train_cost.py 2>&1 | tee $OUT/pytest.log | tail -15
echo "== 1b. the train tests with a GPU present"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m "not slow" tests/train 2>&1 | tail -4
mkdir -p /tmp/res
echo "== 2. train-cost on the GPU"
for b in 128 1024; do
  timeout 90 python3 -m smartmixed.bench train-cost --device cuda --batch-size $b --out /tmp/res/tc-b$b --quiet 2>&1 | head -12
done
echo "== 3. Fashion-MNIST, paper architecture, short protocol, seed 0, on the GPU"
for m in smartmixed fixed:leaky_relu; do
  s=$SECONDS; timeout 150 python3 -m smartmixed.train --data fashion-mnist --data-dir .whl/fashion --preset paper --p1-epochs 5 --p2-epochs 15 --epochs 20 --seed 0 --mode $m --device cuda --out /tmp/res/runs/${m#fixed:} --quiet 2>&1 | tail -3; echo "$m wall $((SECONDS-s)) s"
done
ls /tmp/res/runs/*; python3 -c "import json,glob;[print(p, json.load(open(p))['metrics']['test_accuracy'], round(json.load(open(p))['metrics']['train_seconds'],1)) for p in glob.glob('/tmp/res/runs/*/model.json')]"
rm -f /tmp/res/runs/*/checkpoint.safetensors
tar czf $OUT/results.tgz -C /tmp/res . && ls -la $OUT
