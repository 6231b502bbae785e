#!/bin/bash
# Issue 11, round 15 (two H200s of one host, kind nvidia-h200-x2, six lanes per GPU): round 14 found
# 256-token sequences at batch 16 and a higher learning rate better together (8e-4: 1.9541 / 1.9549,
# 1e-3: 1.9531 test bits per byte); here learning rate 1e-3 on two more seeds, 1.2e-3 (two seeds) and
# 1.5e-3, and around 1e-3: weight decay 0.8 / 1.2, the average's decay 0.998, Adam's b2 0.98, dropout
# 0.15, and 512-token sequences at 1e-3 / 1.2e-3. Carry as round14.sh. Ran at commit f938390 (its
# tuned.py: 128-token sequences at batch 32, learning rate 6e-4; every lane here overrides both).
ROUND=r15 LIMIT=${LIMIT:-480} FIXED=
source "$(dirname "$0")/lanes.sh"
L256="--sweep=data.seq_length=256 --sweep=training.batch_size=16"
L512="--sweep=data.seq_length=512 --sweep=training.batch_size=8"
LR10=--sweep=training.learning_rate=1e-3 LR12=--sweep=training.learning_rate=1.2e-3
CUDA_VISIBLE_DEVICES=0 lane lr1e-3_s1 $L256 $LR10 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=0 lane lr1e-3_s2 $L256 $LR10 --sweep=training.seed=2 &
CUDA_VISIBLE_DEVICES=0 lane lr1.2e-3 $L256 $LR12 &
CUDA_VISIBLE_DEVICES=0 lane lr1.5e-3 $L256 --sweep=training.learning_rate=1.5e-3 &
CUDA_VISIBLE_DEVICES=0 lane lr1e-3_wd0.8 $L256 $LR10 --sweep=training.weight_decay=0.8 &
CUDA_VISIBLE_DEVICES=0 lane lr1e-3_wd1.2 $L256 $LR10 --sweep=training.weight_decay=1.2 &
CUDA_VISIBLE_DEVICES=1 lane lr1.2e-3_s1 $L256 $LR12 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=1 lane L512_lr1e-3 $L512 $LR10 &
CUDA_VISIBLE_DEVICES=1 lane L512_lr1.2e-3 $L512 $LR12 &
CUDA_VISIBLE_DEVICES=1 lane lr1e-3_ema0.998 $L256 $LR10 --sweep=training.ema_decay=0.998 &
CUDA_VISIBLE_DEVICES=1 lane lr1e-3_b2_0.98 $L256 $LR10 --sweep=training.b2=0.98 &
CUDA_VISIBLE_DEVICES=1 lane lr1e-3_do0.15 $L256 $LR10 --sweep=model.dropout=0.15 &
finish
