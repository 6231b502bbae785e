#!/usr/bin/env bash
# Step-time benchmarks of jaxlm against the PyTorch baseline on one GPU, in one call of the device
# tool (see experiments/README.md). Expects the baseline's train.py in .gpu/torch_ref/ and the
# wheels the GPU image lacks in .whl/. Prints one JSON line per run; the log goes to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
base="--config=configs/base.py --steps=100 --vocab_size=8192"
gpu="--config.training.batch_size=32 --config.model.d_model=512 --config.model.num_layers=6 \
     --config.model.num_heads=8 --config.model.d_ff=2048"
run() { echo "## $*"; timeout 300 "$@" 2>&1 | grep -E '^\{|Error|error' ; }
# The original guide's base config, batch 2.
run python3 experiments/bench_step.py $base --config.model.dtype=float32
run python3 experiments/bench_step.py $base --config.model.dtype=bfloat16
run python3 .gpu/torch_ref/train.py --bench-steps 100 --vocab-size 8192 --tf32
run python3 .gpu/torch_ref/train.py --bench-steps 100 --vocab-size 8192 --tf32 --bf16
# The guide's GPU config: batch 32, d512, 6 layers, 8 heads, d_ff 2048.
run python3 experiments/bench_step.py $base $gpu --config.model.dtype=float32
run python3 experiments/bench_step.py $base $gpu --config.model.dtype=bfloat16
run python3 experiments/bench_step.py $base $gpu --config.model.dtype=bfloat16 --config.model.attention=cudnn
run python3 .gpu/torch_ref/train.py --bench-steps 100 --vocab-size 8192 --batch-size 32 --dim-model 512 \
    --num-layers 6 --num-heads 8 --dim-ff 2048 --tf32 --compile --bf16
run python3 experiments/bench_step.py $base $gpu --config.model.dtype=bfloat16
