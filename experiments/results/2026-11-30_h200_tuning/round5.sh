#!/bin/bash
# Issue 11, round 5 (two H200s of one machine, kind nvidia-h200-x2): round 4 found shifted windows
# worth 0.03-0.05 test bits per byte on configs/tuned.py, most with less dropout (0.2: 2.0666) or more
# width (d512: 2.0676). Twelve lanes, six per GPU, each configs/tuned.py + shifted windows + one or two
# changes, one single-point sweep each, all into runs/r5 (round 4's e24 lane, lost to a clash of the
# lanes' sweep.json writes, is rerun here). Carry .whl, .gpu/wikitext-2-mini and the BPE 4096 and 8192
# caches of data/processed; start with the wheels' install (round2.sh's call).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROUND=r5 LIMIT=${LIMIT:-400} FIXED='--sweep=data.shift_windows=true'
source "$(dirname "$0")/lanes.sh"
CUDA_VISIBLE_DEVICES=0 lane e24 --sweep=training.epochs=24 &
CUDA_VISIBLE_DEVICES=0 lane e24do01 --sweep=training.epochs=24 --sweep=model.dropout=0.1 &
CUDA_VISIBLE_DEVICES=0 lane e16do02 --sweep=training.epochs=16 --sweep=model.dropout=0.2 &
CUDA_VISIBLE_DEVICES=0 lane e20do02d512 --sweep=training.epochs=20 --sweep=model.dropout=0.2 --sweep=model.d_model=512 &
CUDA_VISIBLE_DEVICES=0 lane e24do02lr1e3 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.learning_rate=1e-3 &
CUDA_VISIBLE_DEVICES=0 lane e24do02l12 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=model.num_layers=12 &
CUDA_VISIBLE_DEVICES=1 lane e24do02v8192 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=data.tokenizer.vocab_size=8192 &
CUDA_VISIBLE_DEVICES=1 lane e24do02v2048 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=data.tokenizer.vocab_size=2048 &
CUDA_VISIBLE_DEVICES=1 lane e24do02wd03 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.weight_decay=0.3 &
CUDA_VISIBLE_DEVICES=1 lane e24do02l6 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=model.num_layers=6 &
CUDA_VISIBLE_DEVICES=1 lane e24do02s1 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.seed=1 &
CUDA_VISIBLE_DEVICES=1 lane e32do02 --sweep=training.epochs=32 --sweep=model.dropout=0.2 &
finish
