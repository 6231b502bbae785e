#!/bin/bash
# Issue 11, round 8 (one H200, kind nvidia-h200; the session's last device-minutes): round 7's best,
# weight decay 0.6 (still improving at its 24th and last epoch), trained 36 epochs; with a second
# seed, weight decay 1.0, d_model 512, learning rate 1e-3 and dropout 0.1. Six lanes sharing the GPU,
# one single-point sweep each, into runs/r8. Carry .whl, .gpu/wikitext-2-mini and
# data/processed/wikitext-2-mini-bpe4096-*; start with the wheels' install (round2.sh's call).
set -u
LIMIT=${LIMIT:-330}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME --sweep=... ...
  local name=$1; shift
  { echo "lane $name start"; timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D \
      --workdir=runs/r8 --config.training.epochs=36 "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
mkdir -p /tmp/lanes
t0=$(date +%s)
lane wd06 --sweep=training.weight_decay=0.6 &
lane wd06_s1 --sweep=training.weight_decay=0.6 --sweep=training.seed=1 &
lane wd10 --sweep=training.weight_decay=1.0 &
lane wd06_d512 --sweep=training.weight_decay=0.6 --sweep=model.d_model=512 &
lane wd06_lr1e3 --sweep=training.weight_decay=0.6 --sweep=training.learning_rate=1e-3 &
lane wd06_do01 --sweep=training.weight_decay=0.6 --sweep=model.dropout=0.1 &
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|error" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r8
