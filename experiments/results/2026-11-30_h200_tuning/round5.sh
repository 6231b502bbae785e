#!/bin/bash
# Issue 11, round 5 (two H200s of one machine, kind nvidia-h200-x2): round 4 found shifted windows
# worth 0.03-0.05 test bits per byte on configs/tuned.py, most with less dropout (0.2: 2.0666) or more
# width (d512: 2.0676). Twelve lanes, six per GPU, each configs/tuned.py + shifted windows + one or two
# changes, one single-point sweep each, all into runs/r5 (round 4's e24 lane, lost to a clash of the
# lanes' sweep.json writes, is rerun here). Carry .whl, .gpu/wikitext-2-mini and the BPE 4096 and 8192
# caches of data/processed; start with the wheels' install (round2.sh's call).
set -u
LIMIT=${LIMIT:-400}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane GPU NAME --sweep=... ...
  local gpu=$1 name=$2; shift 2
  { echo "lane $name start on GPU $gpu"; CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 $LIMIT python3 -m jaxlm.sweep \
      --config=configs/tuned.py $D --workdir=runs/r5 --sweep=data.shift_windows=true "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
mkdir -p /tmp/lanes
t0=$(date +%s)
lane 0 e24 --sweep=training.epochs=24 &
lane 0 e24do01 --sweep=training.epochs=24 --sweep=model.dropout=0.1 &
lane 0 e16do02 --sweep=training.epochs=16 --sweep=model.dropout=0.2 &
lane 0 e20do02d512 --sweep=training.epochs=20 --sweep=model.dropout=0.2 --sweep=model.d_model=512 &
lane 0 e24do02lr1e3 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.learning_rate=1e-3 &
lane 0 e24do02l12 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=model.num_layers=12 &
lane 1 e24do02v8192 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=data.tokenizer.vocab_size=8192 &
lane 1 e24do02v2048 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=data.tokenizer.vocab_size=2048 &
lane 1 e24do02wd03 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.weight_decay=0.3 &
lane 1 e24do02l6 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=model.num_layers=6 &
lane 1 e24do02s1 --sweep=training.epochs=24 --sweep=model.dropout=0.2 --sweep=training.seed=1 &
lane 1 e32do02 --sweep=training.epochs=32 --sweep=model.dropout=0.2 &
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|error" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r5
ls -la $OUT
