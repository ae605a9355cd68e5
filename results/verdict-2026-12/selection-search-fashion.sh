#!/bin/sh
# The second selection search repeated on full Fashion-MNIST validation (6,000 images), the
# [784, 256, 128, 64, 10] MLP: bilevel selection (sm-bilevel, the default when the search ran),
# the per-layer choice, selection by removal, progressive shrinking to two candidates (sm-shrink,
# the default since) and bilevel with a prior toward relu; fixed relu and leaky_relu beside them.
# Each variant but sm-shrink says --shrink-to 0, the setting it ran with. Adam lr chosen per
# model on seed 0's validation accuracy from {1e-3, 3e-3}, seeds 1-2 at the chosen rate; 5 + 15
# epochs, fixed 20, as fashion-tuned.sh (whose relu, leaky_relu and bilevel cells are these same
# commands). Resumable: run it again and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/selection-search-fashion \
  --data fashion-mnist --models relu,leaky_relu \
  --variant 'sm-bilevel=--shrink-to 0' --variant 'sm-layer=--granularity layer --shrink-to 0' --variant 'sm-removal=--freeze-rule removal --shrink-to 0' \
  --variant 'sm-prior=--logit-prior relu=2 --shrink-to 0' --variant 'sm-shrink=--shrink-to 2' \
  --archs '784,256,128,64,10' --seeds 3 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 5 --p2-epochs 15 --epochs 20
