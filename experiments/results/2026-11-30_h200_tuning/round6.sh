#!/bin/bash
# Issue 11, round 6 (one H200, kind nvidia-h200; the session's last 4 device-minutes): dropout on the
# attention probabilities (model.attention_dropout, new) on configs/tuned.py as round 5 left it
# (shifted windows, dropout 0.2, weight decay 0.3, 24 epochs), with a second seed of tuned.py and of
# the 0.1 arm for the noise. Six lanes sharing the GPU, one single-point sweep each, into runs/r6.
# Carry .whl, .gpu/wikitext-2-mini and data/processed/wikitext-2-mini-bpe4096-*; start with the
# wheels' install (round2.sh's call).
set -u
LIMIT=${LIMIT:-200}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME --sweep=... ...
  local name=$1; shift
  { echo "lane $name start"; timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D \
      --workdir=runs/r6 "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
mkdir -p /tmp/lanes
t0=$(date +%s)
lane tuned --sweep=training.seed=0 &
lane tuned_s1 --sweep=training.seed=1 &
lane ad01 --sweep=model.attention_dropout=0.1 &
lane ad01_s1 --sweep=model.attention_dropout=0.1 --sweep=training.seed=1 &
lane ad02 --sweep=model.attention_dropout=0.2 &
lane ad01do01 --sweep=model.attention_dropout=0.1 --sweep=model.dropout=0.1 &
while [ -n "$(jobs -r)" ]; do sleep 15; echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
grep -h "exit\|summary\|sweep: point\|compiled\|error" /tmp/lanes/*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/r6
