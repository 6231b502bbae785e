#!/bin/bash
# Issue 11, round 10 (one H200, kind nvidia-h200): the two levers new in jaxlm, on configs/tuned.py
# (weight decay 1.0, 36 epochs): a moving average of the weights (training.ema_decay: 0.995, 0.998,
# 0.999, about 1.5, 4 and 7 epochs of 134 steps) and whole input tokens dropped
# (model.token_dropout 0.1, 0.2), and both. Six lanes sharing the GPU, one single-point sweep each,
# into runs/r10. Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*;
# start with the wheels' install (round2.sh's call).
ROUND=r10 LIMIT=${LIMIT:-400} FIXED=
source "$(dirname "$0")/lanes.sh"
lane ema995 --sweep=training.ema_decay=0.995 &
lane ema998 --sweep=training.ema_decay=0.998 &
lane ema999 --sweep=training.ema_decay=0.999 &
lane tokdrop10 --sweep=model.token_dropout=0.1 &
lane tokdrop20 --sweep=model.token_dropout=0.2 &
lane ema998_tokdrop10 --sweep=training.ema_decay=0.998 --sweep=model.token_dropout=0.1 &
finish
