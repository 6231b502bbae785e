#!/bin/bash
# Issue 11, round 7 (one H200, kind nvidia-h200, after `gpu_speed.sh percall` in the same call):
# configs/tuned.py with the hashed dropout masks (model.Dropout, new this session) on two seeds, to
# compare with round 6's threefry masks (2.0494 / 2.0417); heavier weight decay (0.6, 1.0; 0.3 beat
# 0.1 in round 5), alone and with d_model 512; attention dropout 0.2 on a second seed. Six lanes
# sharing the GPU, one single-point sweep each, into runs/r7. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; the wheels are installed first (gpu_speed.sh does it).
ROUND=r7 LIMIT=${LIMIT:-240} FIXED=
source "$(dirname "$0")/lanes.sh"
lane tuned --sweep=training.seed=0 &
lane tuned_s1 --sweep=training.seed=1 &
lane wd06 --sweep=training.weight_decay=0.6 &
lane wd10 --sweep=training.weight_decay=1.0 &
lane wd06_d512 --sweep=training.weight_decay=0.6 --sweep=model.d_model=512 &
lane ad02_s1 --sweep=model.attention_dropout=0.2 --sweep=training.seed=1 &
finish
