#!/bin/sh
# sklearn's digits (1,797 8x8 images: 1,293 train / 144 validation / 360 test), the convnet
# preset (two conv blocks with batchnorm; lenet5's second 5x5 conv does not fit 8x8 input), the
# six fixed activations, SmartMixed with its default flags (bilevel selection, pools shrunk to
# two candidates) and with bilevel selection alone (sm-bilevel, the default before shrinking);
# Adam lr chosen per model on seed 0's validation accuracy from {1e-3, 3e-3}, then seeds 1-4 at
# the chosen rate. SmartMixed 10 + 30 epochs, fixed 40. Resumable: run it again and finished
# cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/convnets-2026-12/digits-convnet \
  --data digits --variant 'sm-bilevel=--shrink-to 0' --archs convnet --seeds 5 \
  --tune-lr 1e-3,3e-3 --tune-seeds 1 --jobs 2 --quiet -- --p1-epochs 10 --p2-epochs 30 --epochs 40
