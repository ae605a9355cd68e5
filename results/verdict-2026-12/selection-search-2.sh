#!/bin/sh
# The second selection search on embedded MNIST validation, from bilevel selection (sm-bilevel,
# the default when the search ran): a per-layer choice (--granularity layer: one activation per
# hidden layer, chosen alike), selection by removal (--freeze-rule removal: activations removed
# from layers while a removal lowers the held-out loss), progressive shrinking of every layer's
# pool to two candidates (sm-shrink, --shrink-to 2, the default since it won this search) and a
# prior toward relu on top of bilevel selection (--logit-prior relu=2); fixed relu and
# leaky_relu beside them. Each variant but sm-shrink says --shrink-to 0, the setting it ran
# with. Adam lr chosen per (architecture, model) on seed 0's validation accuracy from
# {1e-3, 3e-3}, seed 1 at the chosen rate, as in selection-search.sh (whose relu, leaky_relu and
# bilevel cells are these same commands). Resumable: run it again and finished cells are
# skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/selection-search-2 \
  --data mnist --models relu,leaky_relu \
  --variant 'sm-bilevel=--shrink-to 0' --variant 'sm-layer=--granularity layer --shrink-to 0' --variant 'sm-removal=--freeze-rule removal --shrink-to 0' \
  --variant 'sm-prior=--logit-prior relu=2 --shrink-to 0' --variant 'sm-shrink=--shrink-to 2' \
  --archs 'paper;784,256,128,64,10' --seeds 2 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 20 --p2-epochs 60 --epochs 80
