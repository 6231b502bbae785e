#!/bin/bash
# Issue 11, round 3 on two H200s (kind nvidia-h200-x2): the levers rounds 1-2 left untried, each one
# change from configs/tuned.py: context length at the same tokens per step (seq 256/512/1024 at batch
# 16/8/4), a small batch on the full 16-epoch schedule (batch 8 and 16), weight decay 0.5, dropout
# 0.4; one single-point sweep per lane, all into runs/r3, four lanes on each GPU (`levers`). Then
# (`attention`) the same configs with the other attention kernel, since every run at 256 tokens or more
# (where `auto` picks cuDNN's) trailed seq 128 (XLA's):  bash round3.sh levers|attention
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROUND=r3 LIMIT=${LIMIT:-480} FIXED=
source "$(dirname "$0")/lanes.sh"
case ${1:-levers} in
levers)
CUDA_VISIBLE_DEVICES=0 lane ctx256 --sweep=data.seq_length=256 --sweep=training.batch_size=16 &
CUDA_VISIBLE_DEVICES=0 lane ctx512 --sweep=data.seq_length=512 --sweep=training.batch_size=8 &
CUDA_VISIBLE_DEVICES=0 lane ctx1024 --sweep=data.seq_length=1024 --sweep=training.batch_size=4 &
CUDA_VISIBLE_DEVICES=0 lane b8 --sweep=training.batch_size=8 --sweep=training.learning_rate=3e-4 &
CUDA_VISIBLE_DEVICES=1 lane wd05 --sweep=training.weight_decay=0.5 &
CUDA_VISIBLE_DEVICES=1 lane do04 --sweep=model.dropout=0.4 --sweep=training.epochs=20 &
CUDA_VISIBLE_DEVICES=1 lane ctx512do04 --sweep=data.seq_length=512 --sweep=training.batch_size=8 --sweep=model.dropout=0.4 \
  --sweep=training.epochs=20 &
CUDA_VISIBLE_DEVICES=1 lane b16 --sweep=training.batch_size=16 --sweep=training.learning_rate=4e-4 & ;;
attention)
CUDA_VISIBLE_DEVICES=0 lane ctx256xla --sweep=data.seq_length=256 --sweep=training.batch_size=16 --sweep=model.attention=xla &
CUDA_VISIBLE_DEVICES=0 lane ctx512xla --sweep=data.seq_length=512 --sweep=training.batch_size=8 --sweep=model.attention=xla &
CUDA_VISIBLE_DEVICES=1 lane cudnn --sweep=model.attention=cudnn & ;;
esac
finish
