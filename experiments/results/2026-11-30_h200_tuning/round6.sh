#!/bin/bash
# Issue 11, round 6 (one H200, kind nvidia-h200; the session's last 4 device-minutes): dropout on the
# attention probabilities (model.attention_dropout, new) on configs/tuned.py as round 5 left it
# (shifted windows, dropout 0.2, weight decay 0.3, 24 epochs), with a second seed of tuned.py and of
# the 0.1 arm for the noise. Six lanes sharing the GPU, one single-point sweep each, into runs/r6.
# Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*; start with the
# wheels' install (round2.sh's call).
ROUND=r6 LIMIT=${LIMIT:-200} FIXED=
source "$(dirname "$0")/lanes.sh"
lane tuned --sweep=training.seed=0 &
lane tuned_s1 --sweep=training.seed=1 &
lane ad01 --sweep=model.attention_dropout=0.1 &
lane ad01_s1 --sweep=model.attention_dropout=0.1 --sweep=training.seed=1 &
lane ad02 --sweep=model.attention_dropout=0.2 &
lane ad01do01 --sweep=model.attention_dropout=0.1 --sweep=model.dropout=0.1 &
finish
