#!/usr/bin/env bash
# Using a trained model on one GPU, in one call of the device tool (see experiments/README.md):
# train the base config on wikitext-2-mini (samples while training), evaluate it (disjoint and
# sliding windows), generate, export to Hugging Face and compare; then decode speed, cached against
# recomputing. Expects the corpus in .gpu/wikitext-2-mini, its prepared cache in data/processed and
# the wheels the GPU image lacks in .whl/ (all git-ignored; ../shared/tools/device-wheels.sh
# datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18). Logs and JSON lines go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run=/tmp/run
data="--config.data.data_dir=.gpu/wikitext-2-mini"
# 1. Train (3 epochs, guide's base config), then use the model from its work directory alone.
python3 -m jaxlm.main --config=configs/base.py $data --config.workdir=$run 2>&1 | grep -v "^  " | tee $OUT/train.log
cp $run/metrics.jsonl $OUT/train_metrics.jsonl; cp $run/test_metrics.json $OUT/train_test.json
for args in "--split=test" "--split=test --stride=64" "--split=test --stride=32" "--split=validation --stride=64"; do
  python3 -m jaxlm.evaluate --workdir=$run $args --json  # the run's own data source
done | tee $OUT/evaluate.jsonl
{ python3 -m jaxlm.generate --workdir=$run --prompt=" = Valkyria Chronicles =" --max_new_tokens=120 --seed=1
  python3 -m jaxlm.generate --workdir=$run --prompt=" The album" --prompt=" In 1998 ," --num_samples=2 \
      --max_new_tokens=60 --top_p=0.9
  python3 -m jaxlm.generate --workdir=$run --prompt=" The city" --max_new_tokens=200 --temperature=0
} 2>&1 | tee $OUT/generate.log
python3 -m jaxlm.export --workdir=$run --out=/tmp/exported 2>&1 | tee $OUT/export.log
python3 -m pytest -q -p no:cacheprovider tests/test_export.py tests/test_generate.py 2>&1 | tail -5 | tee -a $OUT/export.log
# 2. Decode speed: the guide's base model with 1,024 positions, and a GPT-2-small shape; then batch 1
# again with XLA's command buffers (CUDA graphs) also for while loops, against per-kernel launches.
bench="python3 experiments/bench_generate.py --prompt_tokens=512 --new_tokens=512"
gpt2="--config.model.d_model=768 --config.model.num_layers=12 --config.model.num_heads=12 --config.model.d_ff=3072"
{ $bench --config=configs/base.py --config.model.max_seq_length=1024 --batch_sizes=1,32
  $bench --config=configs/base.py --config.model.max_seq_length=1024 $gpt2 --vocab_size=32768 --batch_sizes=1,32
  export XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
  $bench --config=configs/base.py --config.model.max_seq_length=1024 --batch_sizes=1
  $bench --config=configs/base.py --config.model.max_seq_length=1024 $gpt2 --vocab_size=32768 --batch_sizes=1
} 2>&1 | grep -E '^\{|rror' | tee $OUT/bench_generate.jsonl
