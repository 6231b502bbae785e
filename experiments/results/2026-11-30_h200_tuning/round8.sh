#!/bin/bash
# Issue 11, round 8 (one H200, kind nvidia-h200; the session's last device-minutes): round 7's best,
# weight decay 0.6 (still improving at its 24th and last epoch), trained 36 epochs; with a second
# seed, weight decay 1.0, d_model 512, learning rate 1e-3 and dropout 0.1. Six lanes sharing the GPU,
# one single-point sweep each, into runs/r8. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; start with the wheels' install (round2.sh's call).
ROUND=r8 LIMIT=${LIMIT:-330} FIXED='--config.training.epochs=36'
source "$(dirname "$0")/lanes.sh"
lane wd06 --sweep=training.weight_decay=0.6 &
lane wd06_s1 --sweep=training.weight_decay=0.6 --sweep=training.seed=1 &
lane wd10 --sweep=training.weight_decay=1.0 &
lane wd06_d512 --sweep=training.weight_decay=0.6 --sweep=model.d_model=512 &
lane wd06_lr1e3 --sweep=training.weight_decay=0.6 --sweep=training.learning_rate=1e-3 &
lane wd06_do01 --sweep=training.weight_decay=0.6 --sweep=model.dropout=0.1 &
finish
