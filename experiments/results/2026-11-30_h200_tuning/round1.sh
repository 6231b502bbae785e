#!/bin/bash
# Issue 11, round 1 on one H200: the guide's four configs, and four one-factor sweeps around a
# regularized centre (configs/gpu.py + dropout 0.3, weight decay 0.1, lr 6e-4, 20 epochs,
# patience 3), all on wikitext-2-mini. Five lanes share the GPU (each lane: runs one after another).
# Run from the snapshot's root: bash exp11/round1.sh  (OUT, PYTHONPATH set by the caller)
set -u
LIMIT=${LIMIT:-470}   # seconds for every lane; the call's limit is 600
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
export D=--config.data.data_dir=.gpu/wikitext-2-mini
C="$D --config.model.dropout=0.3 --config.training.weight_decay=0.1 --config.training.learning_rate=6e-4 \
 --config.training.epochs=20 --config.training.patience=3 --config.sample.max_new_tokens=0"
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME CMD...: its console, time-stamped, in $OUT/lane_NAME.txt
  local name=$1; shift
  { echo "lane $name start: $*"; timeout -k 15 $LIMIT "$@"; echo "lane $name exit $?"; } 2>&1 | stamp > $OUT/lane_$name.txt
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import jax; print(jax.__version__, jax.devices())'
t0=$(date +%s)
lane guide bash -c 'for c in base lr_5e-4 more_capacity gpu; do echo "guide run $c"; \
  python3 -m jaxlm.main --config=configs/$c.py $D --config.workdir=runs/guide/$c; echo "guide $c exit $?"; done' &
lane reg python3 -m jaxlm.sweep --config=configs/gpu.py $C --workdir=runs/r1_reg \
  --sweep=model.dropout=0.1,0.2,0.3,0.4 --sweep=training.weight_decay=0.01,0.1 &
lane sched python3 -m jaxlm.sweep --config=configs/gpu.py $C --workdir=runs/r1_sched \
  --sweep=training.learning_rate=3e-4,1.2e-3 --sweep=training.epochs=10,40 &
lane tok python3 -m jaxlm.sweep --config=configs/gpu.py $C --workdir=runs/r1_tok \
  --sweep=data.tokenizer.vocab_size=2048,4096,8192 --sweep=data.seq_length=128,256 &
lane size python3 -m jaxlm.sweep --config=configs/gpu.py $C --workdir=runs/r1_size \
  --sweep=model.d_model=384,768 --sweep=model.num_layers=4,8 &
while [ -n "$(jobs -r)" ]; do sleep 10; echo "t=$(( $(date +%s) - t0 ))s"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done
wait
echo "all lanes done after $(( $(date +%s) - t0 ))s"
grep -h "exit\|summary\|sweep: point" $OUT/lane_*.txt
tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs exp11
ls -la $OUT
