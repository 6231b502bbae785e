#!/bin/bash
# Issue 11, round 3 on two H200s (kind nvidia-h200-x2): the levers rounds 1-2 left untried, each one
# change from configs/tuned.py: context length at the same tokens per step (seq 256/512/1024 at batch
# 16/8/4), a small batch on the full 16-epoch schedule (batch 8 and 16), weight decay 0.5, dropout
# 0.4; one single-point sweep per lane, all into runs/r3, four lanes on each GPU (`levers`). Then
# (`attention`) the same configs with the other attention kernel, since every run at 256 tokens or more
# (where `auto` picks cuDNN's) trailed seq 128 (XLA's):  bash round3.sh levers|attention
set -u
LIMIT=${LIMIT:-480}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME GPU --sweep=... ...
  local name=$1 gpu=$2; shift 2
  { echo "lane $name start"; CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 $LIMIT python3 -m jaxlm.sweep \
      --config=configs/tuned.py $D --workdir=runs/r3 "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
mkdir -p /tmp/lanes  # $OUT takes 8 files at most: the lanes' logs go into one at the end
t0=$(date +%s)
case ${1:-levers} in
levers)
lane ctx256 0 --sweep=data.seq_length=256 --sweep=training.batch_size=16 &
lane ctx512 0 --sweep=data.seq_length=512 --sweep=training.batch_size=8 &
lane ctx1024 0 --sweep=data.seq_length=1024 --sweep=training.batch_size=4 &
lane b8 0 --sweep=training.batch_size=8 --sweep=training.learning_rate=3e-4 &
lane wd05 1 --sweep=training.weight_decay=0.5 &
lane do04 1 --sweep=model.dropout=0.4 --sweep=training.epochs=20 &
lane ctx512do04 1 --sweep=data.seq_length=512 --sweep=training.batch_size=8 --sweep=model.dropout=0.4 \
  --sweep=training.epochs=20 &
lane b16 1 --sweep=training.batch_size=16 --sweep=training.learning_rate=4e-4 & ;;
attention)
lane ctx256xla 0 --sweep=data.seq_length=256 --sweep=training.batch_size=16 --sweep=model.attention=xla &
lane ctx512xla 0 --sweep=data.seq_length=512 --sweep=training.batch_size=8 --sweep=model.attention=xla &
lane cudnn 1 --sweep=model.attention=cudnn & ;;
esac
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|steps per epoch" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r3
ls -la $OUT
