#!/bin/bash
# Issue 11, round 9 (one H200, kind nvidia-h200; the session's last device-minutes): weight decay
# 1.0 won round 8 at 36 epochs (stopped at 34): a second seed of it, then 48 epochs of weight decay
# 1.0, 1.5 and 2.0 (two seeds for 1.0 and 1.5). Six lanes sharing the GPU, one single-point sweep
# each, into runs/r9. Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*;
# start with the wheels' install (round2.sh's call).
ROUND=r9 LIMIT=${LIMIT:-380} FIXED=
source "$(dirname "$0")/lanes.sh"
lane wd10_e36_s1 --sweep=training.weight_decay=1.0 --sweep=training.epochs=36 --sweep=training.seed=1 &
lane wd10_e48 --sweep=training.weight_decay=1.0 --sweep=training.epochs=48 &
lane wd10_e48_s1 --sweep=training.weight_decay=1.0 --sweep=training.epochs=48 --sweep=training.seed=1 &
lane wd15_e48 --sweep=training.weight_decay=1.5 --sweep=training.epochs=48 &
lane wd15_e48_s1 --sweep=training.weight_decay=1.5 --sweep=training.epochs=48 --sweep=training.seed=1 &
lane wd20_e48 --sweep=training.weight_decay=2.0 --sweep=training.epochs=48 &
finish
