#!/bin/bash
# Issue 11, round 14 (two H200s of one host, kind nvidia-h200-x2, six lanes per GPU): on configs/tuned.py
# (rotary positions since round 13), second and third seeds of round 13's two single-seed winners
# (256-token sequences at batch 16; learning rate 8e-4), the two together, 512-token sequences, and
# around the 256-token recipe: batch 8, d_model 512, 10 layers, dropout 0.25, learning rate 1e-3.
# Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*; start with the
# wheels' install (round2.sh's call). Ran at commit f938390, whose configs/tuned.py had 128-token
# sequences at batch 32 and learning rate 6e-4: lanes that override neither train differently on a
# later tuned.py.
ROUND=r14 LIMIT=${LIMIT:-480} FIXED=
source "$(dirname "$0")/lanes.sh"
L256="--sweep=data.seq_length=256 --sweep=training.batch_size=16"
L512="--sweep=data.seq_length=512 --sweep=training.batch_size=8"
LR8=--sweep=training.learning_rate=8e-4
CUDA_VISIBLE_DEVICES=0 lane L256_s1 $L256 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=0 lane L256_s2 $L256 --sweep=training.seed=2 &
CUDA_VISIBLE_DEVICES=0 lane lr8e-4_s1 $LR8 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=0 lane L256_lr8e-4 $L256 $LR8 &
CUDA_VISIBLE_DEVICES=0 lane L256_lr8e-4_s1 $L256 $LR8 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=0 lane L512 $L512 &
CUDA_VISIBLE_DEVICES=1 lane L256_b8 --sweep=data.seq_length=256 --sweep=training.batch_size=8 &
CUDA_VISIBLE_DEVICES=1 lane L256_d512 $L256 --sweep=model.d_model=512 &
CUDA_VISIBLE_DEVICES=1 lane L256_l10 $L256 --sweep=model.num_layers=10 &
CUDA_VISIBLE_DEVICES=1 lane L256_do0.25 $L256 --sweep=model.dropout=0.25 &
CUDA_VISIBLE_DEVICES=1 lane L256_lr1e-3 $L256 --sweep=training.learning_rate=1e-3 &
CUDA_VISIBLE_DEVICES=1 lane L512_lr8e-4 $L512 $LR8 &
finish
