#!/bin/sh
# The selection search on embedded MNIST validation: SmartMixed's default (joint) selection
# against bilevel selection (logits on a held-out fifth of the training split) and a prior
# toward relu (logits start 2 above the others); fixed relu and leaky_relu beside them.
# Adam lr chosen per (architecture, model) on seed 0's validation accuracy from {1e-3, 3e-3}
# (the two rates the tuned study chose from), seed 1 at the chosen rate. Cells of
# relu, leaky_relu and smartmixed are those of mnist-tuned (same flags, same seeds).
# Resumable: run it again and finished cells are skipped.
exec .venv/bin/smartmixed-bench study --out results/verdict-2026-12/selection-search \
  --data mnist --models relu,leaky_relu,smartmixed \
  --variant 'sm-bilevel=--selection bilevel' --variant 'sm-prior=--logit-prior relu=2' \
  --archs 'paper;784,256,128,64,10' --seeds 2 --tune-lr 1e-3,3e-3 --tune-seeds 1 \
  --jobs 2 --quiet -- --p1-epochs 20 --p2-epochs 60 --epochs 80
