#!/bin/bash
# Issue 11, round 13 (one H200, kind nvidia-h200; the session's last device-minutes): rotary position
# embeddings (model.positions=rope, new) on configs/tuned.py (the moving average 0.995, 48 epochs):
# two seeds, with 256-token sequences at batch 16 (the same tokens per step), with d_model 512; and
# learning rate 8e-4 with and without them. Six lanes sharing the GPU, one single-point sweep each,
# into runs/r13. Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*;
# start with the wheels' install (round2.sh's call).
ROUND=r13 LIMIT=${LIMIT:-300} FIXED=
source "$(dirname "$0")/lanes.sh"
R=--sweep=model.positions=rope
lane rope $R &
lane rope_s1 $R --sweep=training.seed=1 &
lane rope_L256 $R --sweep=data.seq_length=256 --sweep=training.batch_size=16 &
lane rope_d512 $R --sweep=model.d_model=512 &
lane lr8e-4 --sweep=training.learning_rate=8e-4 &
lane rope_lr8e-4 $R --sweep=training.learning_rate=8e-4 &
finish
