#!/bin/sh
# The second selection search on embedded MNIST validation, from the default (bilevel
# selection): a per-layer choice (--granularity layer: one activation per hidden layer, chosen
# alike), selection by removal (--freeze-rule removal: activations removed from layers while a
# removal lowers the held-out loss), progressive shrinking of every layer's pool to two
# candidates (--shrink-to 2) and a prior toward relu on top of bilevel selection
# (--logit-prior relu=2); fixed relu and leaky_relu beside them. Adam lr chosen per
# (architecture, model) on seed 0's validation accuracy from {1e-3, 3e-3}, seed 1 at the chosen
# rate, as in selection-search.sh (whose relu, leaky_relu and bilevel cells are these same
# commands). Resumable: run it again and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/selection-search-2 \
  --data mnist --models relu,leaky_relu,smartmixed \
  --variant 'sm-layer=--granularity layer' --variant 'sm-removal=--freeze-rule removal' \
  --variant 'sm-prior=--logit-prior relu=2' --variant 'sm-shrink=--shrink-to 2' \
  --archs 'paper;784,256,128,64,10' --seeds 2 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 20 --p2-epochs 60 --epochs 80
