#!/bin/bash
# The CPU proxy for data.shift_windows (experiments/README.md, "Shifted windows"): a 544k-parameter
# model that overfits the first 400 kB of wikitext-2-mini's train split, with fixed and with shifted
# windows, at the 40-epoch schedule (seeds 0 and 1) and at schedules that end where each stopped
# improving; then the same model on the whole 2 MB train split, 24 epochs (mini2mb_*). Run from the
# repository root; about 50 minutes on 2 cores for the 400 kB runs, 35 for each 2 MB one.
set -u
P=/tmp/proxy
mkdir -p $P && head -c 400000 ../shared/data/wikitext-2-mini/train.txt | head -n -1 > $P/train.txt
cp ../shared/data/wikitext-2-mini/{validation,test}.txt $P/
common="--config=configs/base.py --config.data.data_dir=$P --config.data.processed_dir=$P/processed \
 --config.data.tokenizer.vocab_size=1024 --config.model.d_model=128 --config.model.num_layers=2 --config.model.num_heads=4 \
 --config.model.d_ff=512 --config.training.batch_size=16 --config.training.learning_rate=1e-3 \
 --config.training.patience=3 --config.training.warmup_steps=100 --config.sample.max_new_tokens=0 --config.training.log_every_steps=200"
for arm in "False 40 0 shift_False" "True 40 0 shift_True" "False 15 0 shift_False_e15" "False 20 0 shift_False_e20" \
           "True 25 0 shift_True_e25" "False 40 1 shift_False_seed1" "True 40 1 shift_True_seed1"; do
  set -- $arm
  python -m jaxlm.main $common --config.data.shift_windows=$1 --config.training.epochs=$2 --config.training.seed=$3 \
    --config.workdir=$P/runs/$4 > $P/$4.log 2>&1
done
Q=/tmp/proxy2
mkdir -p $Q && cp ../shared/data/wikitext-2-mini/{train,validation,test}.txt $Q/
for shift in False True; do
  python -m jaxlm.main ${common//$P/$Q} --config.data.shift_windows=$shift --config.training.epochs=24 \
    --config.workdir=$Q/runs/mini2mb_shift_$shift > $Q/mini2mb_shift_$shift.log 2>&1
done
