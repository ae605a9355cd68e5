#!/bin/bash
# Session 4: a more decisive selection on the one missed cell (validation decides)
export PYTHONPATH=/work/e-pkg
B=/work/main/.venv/bin/smartmixed-bench
$B study --out /work/pilot3/f1 --data fashion-mnist --models leaky_relu --variant 'smartmixed=--phase2-init fresh' --variant 'sm-warm=--phase2-init fresh --logit-warmup 0.5' --variant 'sm-lr1=--phase2-init fresh --logit-lr 1e-1' --variant 'sm-anneal=--phase2-init fresh --tau 1.0 --tau-end 0.1' --archs paper --seeds 101,102,103 --jobs 2 -- --p1-epochs 5 --p2-epochs 15 --epochs 20
