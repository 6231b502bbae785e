#!/bin/bash
# Issue 11, round 11 (one H200, kind nvidia-h200): round 10's moving average of the weights
# (training.ema_decay 0.995: test 2.0138 against tuned.py's 2.0181) on a second seed, with a shorter
# horizon, and with the regularizers and schedule it may shift (weight decay 0.8, attention dropout
# 0.2, 48 epochs); then the best checkpoint of the 0.995 runs measured again with sliding windows
# (evaluate --stride), which scores every token with at least 64 or 96 tokens of context. Six lanes
# sharing the GPU, one single-point sweep each, into runs/r11. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; start with the wheels' install (round2.sh's call).
ROUND=r11 LIMIT=${LIMIT:-400} FIXED=
source "$(dirname "$0")/lanes.sh"
E=--sweep=training.ema_decay
lane ema995_s1 $E=0.995 --sweep=training.seed=1 &
lane ema990 $E=0.99 &
lane ema998_s1 $E=0.998 --sweep=training.seed=1 &
lane ema995_wd08 $E=0.995 --sweep=training.weight_decay=0.8 &
lane ema995_e48 $E=0.995 --sweep=training.epochs=48 &
lane ema995_adrop20 $E=0.995 --sweep=model.attention_dropout=0.2 &
finish
for point in runs/r11/ema_decay=0.995,seed=1 runs/r11/ema_decay=0.995,attention_dropout=0.2; do
  for stride in 64 32; do
    python3 -m jaxlm.evaluate --workdir=$point --data_dir=.gpu/wikitext-2-mini --stride=$stride --json
  done
done 2>&1 | grep -v "^I0000\|^W0000" | tee $OUT/stride.txt
