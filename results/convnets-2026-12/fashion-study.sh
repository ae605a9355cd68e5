#!/bin/sh
# Full Fashion-MNIST (Debian's dataset-fashion-mnist: 60,000 train images split into train and
# validation, the 10,000 test images held out), the lenet5 preset, the six fixed activations,
# SmartMixed with its default flags (bilevel selection, pools shrunk to two candidates), with
# bilevel selection alone (sm-bilevel, the default before shrinking) and with joint selection
# (sm-joint, the default before bilevel; its cells predate the selection field); Adam lr chosen
# per model on seed 0's validation accuracy from {1e-4, 1e-3, 3e-3}, then seeds 1-4 at the
# chosen rate. SmartMixed 3 + 6 epochs, fixed 9 epochs. Resumable: run it again and finished
# cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/convnets-2026-12/fashion-lenet5 \
  --data fashion-mnist --variant 'sm-bilevel=--shrink-to 0' \
  --variant 'sm-joint=--selection joint --shrink-to 0' --archs lenet5 --seeds 5 \
  --tune-lr 1e-4,1e-3,3e-3 --tune-seeds 1 --jobs 2 --quiet -- --p1-epochs 3 --p2-epochs 6 --epochs 9
