#!/bin/bash
# Issue 11, round 4 (written for the next session, one H200, kind nvidia-h200; not run yet):
# configs/tuned.py with data.shift_windows=true (each epoch's train windows at a new offset), which
# on CPU proxies (experiments/README.md, "Shifted windows") kept a small model improving for twice
# the epochs on 400 kB (-0.08 test bits per byte) and gained 0.016 on the whole 2 MB, where that
# model hardly overfits. With the overfitting delayed, longer schedules,
# less dropout, more width and longer sequences get a second chance. Six lanes sharing the GPU, one
# single-point sweep each, all into runs/r4. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; start with the wheels' install (round2.sh's call).
ROUND=r4 LIMIT=${LIMIT:-540} FIXED='--sweep=data.shift_windows=true'
source "$(dirname "$0")/lanes.sh"
lane e16 --sweep=training.epochs=16 &
lane e24 --sweep=training.epochs=24 &
lane e32 --sweep=training.epochs=32 &
lane e24do02 --sweep=training.epochs=24 --sweep=model.dropout=0.2 &
lane e24d512 --sweep=training.epochs=24 --sweep=model.d_model=512 &
lane e24ctx256 --sweep=training.epochs=24 --sweep=data.seq_length=256 --sweep=training.batch_size=16 &
finish
