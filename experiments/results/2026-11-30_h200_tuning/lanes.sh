# What round3-9.sh share, sourced by each after it sets ROUND (runs/$ROUND), LIMIT (seconds per lane)
# and FIXED (arguments every lane's sweep gets): `lane NAME ARGS... &` runs one `jaxlm.sweep` of
# configs/tuned.py on wikitext-2-mini with FIXED and ARGS, its console timestamped in
# /tmp/lanes/NAME.txt (prefix CUDA_VISIBLE_DEVICES=N to pin it to one GPU); `finish` waits for the
# lanes, printing the GPUs' use every 15 s, then puts the consoles into $OUT/lanes.txt and the runs
# (without checkpoints) into $OUT/runs.tgz: the device tool brings back 8 files at most.
set -u
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.12}
D=--config.data.data_dir=.gpu/wikitext-2-mini
stamp() { while IFS= read -r l; do printf '%(%H:%M:%S)T %s\n' -1 "$l"; done; }
lane() {  # lane NAME --sweep=... ...
  local name=$1; shift
  { echo "lane $name start${CUDA_VISIBLE_DEVICES:+ on GPU $CUDA_VISIBLE_DEVICES}"
    timeout -k 10 $LIMIT python3 -m jaxlm.sweep --config=configs/tuned.py $D --workdir=runs/$ROUND $FIXED "$@"
    echo "lane $name exit $?"; } 2>&1 | stamp > /tmp/lanes/$name.txt
}
finish() {
  while [ -n "$(jobs -r)" ]; do
    sleep 15
    echo "t=$(( $(date +%s) - t0 ))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')"
  done
  wait
  echo "all lanes done after $(( $(date +%s) - t0 ))s"
  for f in /tmp/lanes/*.txt; do echo "== $f"; cat $f; done > $OUT/lanes.txt
  grep -h "exit\|summary\|sweep: point\|compiled\|steps per epoch\|error" /tmp/lanes/*.txt
  tar --exclude=checkpoints --exclude=tokenizer.json -czf $OUT/runs.tgz runs/$ROUND
}
rm -rf /tmp/lanes; mkdir -p /tmp/lanes  # a warm machine keeps the last call's consoles
t0=$(date +%s)
