#!/bin/sh
# The second selection search repeated on full Fashion-MNIST validation (6,000 images), the
# [784, 256, 128, 64, 10] MLP: the default (bilevel selection), the per-layer choice, selection
# by removal, progressive shrinking to two candidates and bilevel with a prior toward relu; fixed
# relu and leaky_relu beside them. Adam lr chosen per model on seed 0's validation accuracy from
# {1e-3, 3e-3}, seeds 1-2 at the chosen rate; 5 + 15 epochs, fixed 20, as fashion-tuned.sh
# (whose relu, leaky_relu and default cells are these same commands). Resumable: run it again
# and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/selection-search-fashion \
  --data fashion-mnist --models relu,leaky_relu,smartmixed \
  --variant 'sm-layer=--granularity layer' --variant 'sm-removal=--freeze-rule removal' \
  --variant 'sm-prior=--logit-prior relu=2' --variant 'sm-shrink=--shrink-to 2' \
  --archs '784,256,128,64,10' --seeds 3 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 5 --p2-epochs 15 --epochs 20
