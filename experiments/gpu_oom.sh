#!/usr/bin/env bash
# The device running out of memory on a GPU (device tool, kind nvidia-h200): each command ends with
# one `error:` line and status 1, and a run's checkpoints stay. Expects the GPU image's missing wheels
# in .whl/ and, in data/oom/, a test corpus (tests/conftest.py's write_corpus, 40 train articles) and
# its prepared cache from the tiny config (carry .whl and data/oom).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/log.txt
args="--config=configs/base.py:tiny --config.data.data_dir=data/oom/corpus --config.data.raw_dir=/tmp/raw \
      --config.data.processed_dir=data/oom/processed"
one() { echo "## $*" | tee -a $OUT/log.txt
        timeout 240 python3 -m jaxlm.main $args "$@" > /tmp/stdout.txt 2> /tmp/stderr.txt
        echo "status $?; stdout's last lines:" | tee -a $OUT/log.txt; tail -n 3 /tmp/stdout.txt | tee -a $OUT/log.txt
        echo "stderr, $(wc -l < /tmp/stderr.txt) line(s):" | tee -a $OUT/log.txt; tail -c 2500 /tmp/stderr.txt | tee -a $OUT/log.txt; }
one --config.workdir=/tmp/r1 --config.model.d_ff=8589934592  # 1 TB of parameters: the fresh state
one --config.workdir=/tmp/r2 --config.training.epochs=1 --config.training.eval_batch_size=16777216  # validation
ls -R /tmp/r2/checkpoints | head -20 | tee -a $OUT/log.txt
one --config.workdir=/tmp/r2 --config.training.epochs=1  # the same run, resumed with the defaults: from `last`
