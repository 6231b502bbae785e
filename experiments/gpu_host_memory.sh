#!/usr/bin/env bash
# Host memory of a long GPU run (experiments/host_memory.py), in one call of the device tool: the GPU
# config on wikitext-2-mini for 150 (or $EPOCHS) epochs: 116 steps each, `last` saved every epoch and
# `best` at each improvement (about 510 saves in 500 epochs), a sample every epoch. Expects the corpus in .gpu/wikitext-2-mini, its prepared cache in
# data/processed (python -m jaxlm.data --config=configs/gpu.py --config.data.data_dir=.gpu/wikitext-2-mini)
# and the wheels the GPU image lacks in .whl/. JSON lines and the run's log go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 experiments/host_memory.py -- python3 -m jaxlm.main --config=configs/gpu.py \
    --config.data.data_dir=.gpu/wikitext-2-mini --config.workdir=/tmp/run --config.training.epochs=${EPOCHS:-150} \
    --config.training.patience=1000 2> $OUT/run.log | tee $OUT/host_memory.jsonl
grep -E "^(devices|model|data|compiled|epoch [0-9]+/[0-9]+ \|)" $OUT/run.log | head -8
tail -3 $OUT/run.log
