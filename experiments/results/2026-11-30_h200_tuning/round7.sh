#!/bin/bash
# Issue 11, round 7 (one H200, kind nvidia-h200, after `gpu_speed.sh percall` in the same call):
# configs/tuned.py with the hashed dropout masks (model.Dropout, new this session) on two seeds, to
# compare with round 6's threefry masks (2.0494 / 2.0417); heavier weight decay (0.6, 1.0; 0.3 beat
# 0.1 in round 5), alone and with d_model 512; attention dropout 0.2 on a second seed. Six lanes
# sharing the GPU, one single-point sweep each, into runs/r7. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; the wheels are installed first (gpu_speed.sh does it).
set -u
LIMIT=${LIMIT:-240}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME --sweep=... ...
  local name=$1; shift
  { echo "lane $name start"; timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D \
      --workdir=runs/r7 "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
mkdir -p /tmp/lanes
t0=$(date +%s)
lane tuned --sweep=training.seed=0 &
lane tuned_s1 --sweep=training.seed=1 &
lane wd06 --sweep=training.weight_decay=0.6 &
lane wd10 --sweep=training.weight_decay=1.0 &
lane wd06_d512 --sweep=training.weight_decay=0.6 --sweep=model.d_model=512 &
lane ad02_s1 --sweep=model.attention_dropout=0.2 --sweep=training.seed=1 &
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|error" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r7
