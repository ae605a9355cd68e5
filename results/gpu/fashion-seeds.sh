#!/bin/bash
# Issue E's missed cell replicated on new seeds (8-12), on the GPU: Fashion-MNIST, paper
# architecture, short protocol, default flags; 15 runs at once on one GPU.
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/wheels/*.whl || exit 3
mkdir -p /tmp/pkg /tmp/r && ln -sfn "$PWD" /tmp/pkg/smartmixed
export PYTHONPATH=/tmp/pkg:/tmp/site
run() {
  name=${1#fixed:}-$2
  timeout 300 python3 -m smartmixed.train --data fashion-mnist --data-dir .whl/fashion --preset paper \
    --p1-epochs 5 --p2-epochs 15 --epochs 20 --seed $2 --mode $1 --device cuda --out /tmp/r/$name --quiet > /tmp/r/$name.log 2>&1
  python3 -c "import json;m=json.load(open('/tmp/r/$name/model.json'))['metrics'];print(json.dumps({'model':'${1#fixed:}','seed':$2,'test_accuracy':m['test_accuracy'],'val_accuracy':m['val_accuracy'],'train_seconds':m['train_seconds']}))" >> $OUT/seeds.jsonl || tail -3 /tmp/r/$name.log
}
s=$SECONDS
for seed in 8 9 10 11 12; do for m in smartmixed fixed:leaky_relu fixed:relu; do run $m $seed & done; done
wait
echo "all done in $((SECONDS-s)) s"; sort $OUT/seeds.jsonl
