#!/bin/sh
# Redraws the docs' figures from the committed histories (run from the project root, in the
# environment). tests/test_docs.py runs each command below and compares the result pixel by pixel.
set -e
python docs/figures/recipes_figure.py --stage docs/figures/original-defaults-curves.png \
  "--source=Data: CIFAR-10 as a JPEG (quality 75) copy, md5 0f86bb969cf3561244b4124d383e2324. Run of 2026-11-30 at commit 4eb6d39 on a 2-core AMD EPYC with AVX512_BF16." \
  original=docs/results/original-defaults-2026-11-30_history.csv
python docs/figures/recipes_figure.py docs/figures/recommended-2026-11-30.png \
  "--source=JPEG (quality 75) copy of CIFAR-10, md5 0f86bb96...; 2026-11-30, 2-core AMD EPYC, AVX512_BF16; commits 4eb6d39 (original), 96eac8e, fc3d6c0, 649823d (seeds 42, 1, 7)" \
  original=docs/results/original-defaults-2026-11-30_history.csv \
  recipe-sgd-plus=docs/results/recipe-sgd-plus_history.csv \
  "recipe-sgd-plus seed 1=docs/results/recipe-sgd-plus-seed1_history.csv" \
  "recipe-sgd-plus seed 7=docs/results/recipe-sgd-plus-seed7_history.csv"
python docs/figures/recipes_figure.py docs/figures/search-2026-11-30.png \
  "--source=Data: CIFAR-10 as a JPEG (quality 75) copy, md5 0f86bb969cf3561244b4124d383e2324. recipe-sgd: 2026-11-29; the others: 2026-11-30; a 2-core AMD EPYC with AVX512_BF16." \
  recipe-sgd=docs/results/recipe-sgd_history.csv \
  "recipe-sgd seed 7=docs/results/recipe-sgd-seed7_history.csv" \
  "label smoothing 0.2=docs/results/recipe-sgd-ls02_history.csv" \
  "whitening init=docs/results/recipe-sgd-white_history.csv" \
  recipe-sgd-plus=docs/results/recipe-sgd-plus_history.csv \
  "recipe-sgd-plus seed 7=docs/results/recipe-sgd-plus-seed7_history.csv" \
  "recipe-sgd-plus seed 1=docs/results/recipe-sgd-plus-seed1_history.csv"
python docs/figures/recipes_figure.py docs/figures/search-avx2-2026-12-05.png \
  "--source=Data: CIFAR-10 as a JPEG (quality 75) copy, md5 0f86bb969cf3561244b4124d383e2324. 2026-12-05, a 2-core AMD EPYC with AVX2 only, float32, seed 42; commits ac1b940 (recipe-sgd-plus-f32, label smoothing 0.3) and 8ecf1b6 (the weight decay runs)." \
  "recipe-sgd-plus, float32=docs/results/recipe-sgd-plus-f32_history.csv" \
  "label smoothing 0.3=docs/results/recipe-sgd-plus-ls03_history.csv" \
  "weight decay 0.0025=docs/results/recipe-sgd-plus-wd0025_history.csv" \
  "weight decay 0.01=docs/results/recipe-sgd-plus-wd01_history.csv" \
  "decay on kernels only=docs/results/recipe-sgd-plus-kernel-decay_history.csv"
