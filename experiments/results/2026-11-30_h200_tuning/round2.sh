#!/bin/bash
# Issue 11, round 2 on one H200: the round-1 winners together (configs/tuned.py's draft: gpu.py +
# BPE 4096, d384 x 8 layers, dropout 0.3, weight decay 0.1), at batch 32/16/8/4/2 and 12 layers;
# one single-point sweep per lane, all in runs/r2, six lanes sharing the GPU.
set -u
LIMIT=${LIMIT:-180}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.1
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME B LR EPOCHS LAYERS
  { echo "lane $1 start"; timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D --workdir=runs/r2 \
      --sweep=training.batch_size=$2 --sweep=training.learning_rate=$3 --sweep=training.epochs=$4 --sweep=model.num_layers=$5
    echo "lane $1 exit $?"; } 2>&1 | stamp > $OUT/lane_$1.txt
}
t0=$(date +%s)
lane b32 32 6e-4 16 8 &
lane b16 16 5e-4 12 8 &
lane b8 8 4e-4 10 8 &
lane b4 4 3e-4 8 8 &
lane b16l12 16 5e-4 12 12 &
lane b2 2 3e-4 6 8 &
while [ -n "$(jobs -r)" ]; do sleep 10; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
grep -h "exit\|summary\|sweep: point\|compiled\|steps per epoch" $OUT/lane_*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r2 exp11 configs/tuned.py
ls -la $OUT
