#!/bin/bash
# Issue 11, round 9 (one H200, kind nvidia-h200; the session's last device-minutes): weight decay
# 1.0 won round 8 at 36 epochs (stopped at 34): a second seed of it, then 48 epochs of weight decay
# 1.0, 1.5 and 2.0 (two seeds for 1.0 and 1.5). Six lanes sharing the GPU, one single-point sweep
# each, into runs/r9. Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*;
# start with the wheels' install (round2.sh's call).
set -u
LIMIT=${LIMIT:-380}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME --sweep=... ...
  local name=$1; shift
  { echo "lane $name start"; timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D \
      --workdir=runs/r9 "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
rm -rf /tmp/lanes; mkdir -p /tmp/lanes
t0=$(date +%s)
lane wd10_e36_s1 --sweep=training.weight_decay=1.0 --sweep=training.epochs=36 --sweep=training.seed=1 &
lane wd10_e48 --sweep=training.weight_decay=1.0 --sweep=training.epochs=48 &
lane wd10_e48_s1 --sweep=training.weight_decay=1.0 --sweep=training.epochs=48 --sweep=training.seed=1 &
lane wd15_e48 --sweep=training.weight_decay=1.5 --sweep=training.epochs=48 &
lane wd15_e48_s1 --sweep=training.weight_decay=1.5 --sweep=training.epochs=48 --sweep=training.seed=1 &
lane wd20_e48 --sweep=training.weight_decay=2.0 --sweep=training.epochs=48 &
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|error" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r9
