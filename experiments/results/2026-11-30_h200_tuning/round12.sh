#!/bin/bash
# Issue 11, round 12 (one H200, kind nvidia-h200): round 11's best, the moving average (0.995) with
# the cosine stretched to 48 epochs (test 2.0053), on two more seeds, with weight decay 0.8, a
# 0.998 average and a 60-epoch cosine. Six lanes sharing the GPU, one single-point sweep each, into
# runs/r12. Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*; start
# with the wheels' install (round2.sh's call).
ROUND=r12 LIMIT=${LIMIT:-420} FIXED=
source "$(dirname "$0")/lanes.sh"
E=--sweep=training.ema_decay
lane ema995_e48_s1 $E=0.995 --sweep=training.epochs=48 --sweep=training.seed=1 &
lane ema995_e48_s2 $E=0.995 --sweep=training.epochs=48 --sweep=training.seed=2 &
lane ema995_e48_wd08 $E=0.995 --sweep=training.epochs=48 --sweep=training.weight_decay=0.8 &
lane ema995_e48_wd08_s1 $E=0.995 --sweep=training.epochs=48 --sweep=training.weight_decay=0.8 --sweep=training.seed=1 &
lane ema998_e48 $E=0.998 --sweep=training.epochs=48 &
lane ema995_e60 $E=0.995 --sweep=training.epochs=60 &
finish
