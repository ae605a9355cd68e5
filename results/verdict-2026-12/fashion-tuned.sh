#!/bin/sh
# Full Fashion-MNIST (Debian's dataset-fashion-mnist: 70,000 images; 54,000 train / 6,000
# validation / 10,000 test), the paper architecture, [784, 256, 128, 64, 10] and one hidden
# layer of 512; fixed relu, tanh and leaky_relu (the best fixed activations of the earlier
# Fashion-MNIST studies), SmartMixed with its default flags (bilevel selection, pools shrunk to
# two candidates) and with bilevel selection alone (sm-bilevel, the default before shrinking).
# Adam lr chosen per (architecture, model) on seed 0's validation accuracy from {1e-3, 3e-3},
# then seeds 1-4 at the chosen rate. Short protocol: SmartMixed 5 + 15 epochs, fixed 20.
# Resumable: run it again and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/fashion-tuned \
  --data fashion-mnist --models relu,tanh,leaky_relu,smartmixed \
  --variant 'sm-bilevel=--shrink-to 0' \
  --archs 'paper;784,256,128,64,10;784,512,10' --seeds 5 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 5 --p2-epochs 15 --epochs 20
