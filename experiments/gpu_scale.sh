#!/usr/bin/env bash
# Issue 10's measurements on a 2-GPU machine (device tool kind nvidia-h200-x2), one call:
#   bash experiments/gpu_scale.sh bench|flags|overlap|channels|triton|hlo|verify|retime|retime2|comm|comm2|comm3|embed|profile|profile1|small|scan|run ...   (in the order given)
# GPT-2-small's shape (d768, 12 layers, 12 heads, seq 1024, vocab 32768, bf16, cuDNN attention) at
# batch 16 per GPU: one GPU, then two GPUs data parallel and fsdp, back to back. Expects the GPU
# image's missing wheels in .whl/ and, for `run`, the corpus and cache gpu_speed.sh describes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/log.txt
nvidia-smi topo -m | tee -a $OUT/log.txt
bench="python3 experiments/bench_step.py --config=configs/base.py --vocab_size=32768 --modes=calls \
       --steps_per_call=1 --steps=30 --config.data.seq_length=1024 --config.model.d_model=768 \
       --config.model.num_layers=12 --config.model.num_heads=12 --config.model.d_ff=3072 --config.model.attention=cudnn"
# The comm sections' pair: one GPU at 16 sequences, two GPUs data parallel at 32 (16 per GPU).
one="$bench --config.training.batch_size=16 --steps=20 --repeats=2"
dp="$bench --config.training.batch_size=32 --steps=20 --repeats=2"
sym="--xla_gpu_experimental_enable_nccl_symmetric_buffers=true"
run() { echo "## $*" | tee -a $OUT/log.txt; timeout 150 env "$@" > /tmp/run.log 2>&1
        grep -E '^\{|^compiled|^epoch|^test|^devices|^resum|Error|error' /tmp/run.log | tee -a $OUT/log.txt; }
for section in "$@"; do
  case $section in
  bench)  # 1 GPU, then 2 GPUs: data parallel, fsdp
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16
    run $bench --config.training.batch_size=32
    run $bench --config.training.batch_size=32 --config.mesh.fsdp=2
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 ;;
  flags)  # XLA's scheduling of the gradient reduction
    for f in "--xla_gpu_enable_latency_hiding_scheduler=true" \
             "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=8388608" \
             "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=134217728"; do
      run XLA_FLAGS="$f" $bench --config.training.batch_size=32
    done
    run XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" $bench --config.training.batch_size=32 --config.mesh.fsdp=2 ;;
  overlap)  # is the gradient all-reduce overlapped with the backward pass? Each profile prints per GPU the
            # collectives' time that no compute kernel overlaps ("exposed"); 1 GPU first and last
    p="--steps=20 --profile_kernels=25"
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 $p --profile=/tmp/ov_one
    run $bench --config.training.batch_size=32 $p --profile=/tmp/ov_dp
    run JAX_OPTIMIZATION_LEVEL=O1 $bench --config.training.batch_size=32 $p --profile=/tmp/ov_o1
    run NCCL_PROTO=Simple XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
        --xla_gpu_all_reduce_combine_threshold_bytes=16777216" $bench --config.training.batch_size=32 $p --profile=/tmp/ov_lhs16
    run XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true \
        --xla_gpu_all_reduce_combine_threshold_bytes=4194304" $bench --config.training.batch_size=32 $p --profile=/tmp/ov_lhs4
    run XLA_FLAGS="--xla_gpu_enable_command_buffer=" $bench --config.training.batch_size=32 --steps=20
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --config.model.scan_layers=true --steps=20
    run JAX_OPTIMIZATION_LEVEL=O1 $bench --config.training.batch_size=32 --config.model.scan_layers=true $p --profile=/tmp/ov_scan
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --steps=20 ;;
  channels)  # `overlap` found the reduction hidden (0.15-0.2 ms exposed) but the compute kernels 1.7 ms
             # slower beside it: fewer NCCL channels (SMs) for it, with each protocol
    one3="$bench --config.training.batch_size=16 --steps=20"; dp3="$bench --config.training.batch_size=32 --steps=20"
    run CUDA_VISIBLE_DEVICES=0 $one3
    run $dp3
    for c in 2 4 8; do run NCCL_MAX_NCHANNELS=$c $dp3; done
    run NCCL_MAX_NCHANNELS=4 NCCL_PROTO=Simple $dp3
    run NCCL_MAX_NCHANNELS=4 NCCL_PROTO=LL128 $dp3
    run CUDA_VISIBLE_DEVICES=0 $one3 ;;
  triton)  # cuBLAS for every matmul (XLA_FLAGS=--xla_gpu_enable_triton_gemm=false: 2.5% faster on one GPU at
           # this shape, gpu_speed.sh decide), on 1 GPU and 2, back to back with the defaults
    nt="XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16
    run $bench --config.training.batch_size=32
    run CUDA_VISIBLE_DEVICES=0 $nt $bench --config.training.batch_size=16
    run $nt $bench --config.training.batch_size=32
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 ;;
  hlo)  # the 1-GPU and 2-GPU training programs after XLA's optimizations, to read offline (which dots
        # change their operands' layouts once partitioned)
    d="--xla_dump_hlo_as_text"
    run CUDA_VISIBLE_DEVICES=0 XLA_FLAGS="--xla_dump_to=/tmp/hlo1 $d" $bench --config.training.batch_size=16 --steps=2 --repeats=1
    run XLA_FLAGS="--xla_dump_to=/tmp/hlo2 $d" $bench --config.training.batch_size=32 --steps=2 --repeats=1
    ls -la /tmp/hlo1 /tmp/hlo2 | head -20
    tar -czf $OUT/hlo.tgz $(find /tmp/hlo1 /tmp/hlo2 -name '*after_optimizations.txt' -size +200k) ;;
  verify)  # the defaults chosen from `triton` and `small`: cuBLAS matmuls for the GPT-2-small shape on 1
           # GPU and 2, then a whole 2-epoch run of the GPU config on 2 GPUs (now 10 steps per call)
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --steps=20 --repeats=2
    run $bench --config.training.batch_size=32 --steps=20 --repeats=2
    run python3 -m jaxlm.main --config=configs/gpu.py --config.data.data_dir=.gpu/wikitext-2-x5 \
        --config.workdir=/tmp/runv --config.training.epochs=2 --config.sample.max_new_tokens=0
    cp /tmp/runv/metrics.jsonl $OUT/verify_2gpu_metrics.jsonl ;;
  retime)  # the GPT-2-small shape on 1 GPU and on 2 (data parallel) with today's code, at 1 step per
           # call and at 2 (the default for large steps in runs of 100,000 steps or more)
    for k in 1 2; do
      run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --steps=20 --repeats=2 --steps_per_call=$k
      run $bench --config.training.batch_size=32 --steps=20 --repeats=2 --steps_per_call=$k
    done ;;
  retime2)  # fsdp re-timed (with retime's data parallel beside it): the GPT-2-small shape on 1 GPU, 2 data
            # parallel, 2 fsdp, 1 again; then whole 3-epoch runs of the GPU config on 2 GPUs and on 1
            # (validation in calls of up to 16 batches, log lines fetched once the next call is queued)
    export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --steps=20 --repeats=2
    run $bench --config.training.batch_size=32 --steps=20 --repeats=2
    run $bench --config.training.batch_size=32 --steps=20 --repeats=2 --config.mesh.fsdp=2
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --steps=20 --repeats=2
    common="--config=configs/gpu.py --config.data.data_dir=.gpu/wikitext-2-x5 --config.training.epochs=3"
    run python3 -m jaxlm.main $common --config.workdir=/tmp/run_2gpu
    run CUDA_VISIBLE_DEVICES=0 python3 -m jaxlm.main $common --config.workdir=/tmp/run_1gpu
    for r in 2gpu 1gpu; do cp /tmp/run_$r/metrics.jsonl $OUT/retime2_${r}_metrics.jsonl; done
    unset JAX_COMPILATION_CACHE_DIR ;;
  comm)  # NCCL's lighter all-reduce kernels, against the compute slowed beside the ring kernels (the
         # 97% gap, "Where the 2-GPU step's extra time goes"): symmetric memory windows (NCCL 2.27's
         # load-store kernels over NVLink, no multicast), registered user buffers, one hardware queue
    run CUDA_VISIBLE_DEVICES=0 $one
    run $dp
    run XLA_FLAGS="$sym" NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,TUNING $dp
    grep -iE "symmetric|window|NCCL version" /tmp/run.log | sort | uniq -c | head -20 | tee -a $OUT/log.txt
    run XLA_FLAGS="--xla_gpu_enable_nccl_user_buffers=true" $dp
    run XLA_FLAGS="$sym --xla_gpu_enable_nccl_user_buffers=true" $dp
    run CUDA_VISIBLE_DEVICES=0 $one ;;
  comm2)  # the rest of `comm` (one call of the device tool runs at most 10 minutes)
    run CUDA_VISIBLE_DEVICES=0 $one
    run $dp
    run CUDA_DEVICE_MAX_CONNECTIONS=1 $dp
    run NCCL_PROTO=Simple XLA_FLAGS="$sym" $dp
    run $dp --config.mesh.fsdp=2
    run XLA_FLAGS="$sym" $dp --config.mesh.fsdp=2
    # NCCL's CTA policies (ncclConfig_t.CTAPolicy, 2.27+, read from the environment by the image's
    # 2.28.9): 1 = efficiency, the fewest CTAs, for overlap; 2 = zero CTAs where it can
    run NCCL_CTA_POLICY=1 $dp
    run NCCL_CTA_POLICY=2 XLA_FLAGS="$sym" $dp
    run CUDA_VISIBLE_DEVICES=0 $one ;;
  comm3)  # XLA's own collective switches in jax 0.11.2's plugin (results/2026-12-02_h200_nccl_xla_collective_flags.txt):
          # its collective kernels instead of NCCL's, more streams, all-reduce as reduce-scatter + all-gather
    run CUDA_VISIBLE_DEVICES=0 $one
    run $dp
    # (each parsed by XLA on one H200; --xla_gpu_enable_all_reduce_splitter and
    # --xla_gpu_allow_all_reduce_kernel are not flags of this XLA, only names in its library)
    for f in --xla_gpu_experimental_use_collective_kernels=all_reduce \
             --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true \
             --xla_gpu_experimental_enable_collective_multi_streaming=true \
             --xla_gpu_unsupported_enable_all_reduce_decomposer=true; do
      run XLA_FLAGS="$f" $dp
    done
    run CUDA_VISIBLE_DEVICES=0 $one ;;
  embed)  # the tied embedding's lookup gradient all-reduced in bfloat16, not float32 (bench_variants'
          # embedding_grad_bf16, embedding_grad_hlo.py), timed against the model as it is, alternating
    vary="python3 experiments/bench_variants.py ${bench#python3 experiments/bench_step.py} --steps=20 --rounds=4 --variants=now,embedding_grad_bf16"
    run CUDA_VISIBLE_DEVICES=0 $vary --config.training.batch_size=16
    run XLA_FLAGS="--xla_dump_to=/tmp/dump_embed" $vary --config.training.batch_size=32
    for f in /tmp/dump_embed/*jit_train_steps*after_optimizations.txt; do  # each program's all-reduces
      echo "$(basename $f):" | tee -a $OUT/log.txt
      grep -E " all-reduce-start\(" $f | sed -E 's/ all-reduce-start\(.*//' | cut -c1-240 | tee -a $OUT/log.txt
    done
    run CUDA_VISIBLE_DEVICES=0 $vary --config.training.batch_size=16 ;;
  profile)  # where the 2-GPU data-parallel step's time goes (the all-reduce kernels' dtype and time)
    run $bench --config.training.batch_size=32 --repeats=1 --profile=/tmp/prof_dp ;;
  profile1)  # the same profile on one GPU, to set beside `profile` (which kernels grow on 2 GPUs)
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --repeats=1 --profile=/tmp/prof_one ;;
  small)  # the guide's GPU config (16 x 128 tokens per GPU): slower on 2 GPUs than on 1 in a run; why?
    small="python3 experiments/bench_step.py --config=configs/gpu.py --vocab_size=8192 --modes=calls --steps=320"
    run CUDA_VISIBLE_DEVICES=0 $small --steps_per_call=1,16
    run $small --steps_per_call=1,16
    run $small --steps_per_call=1 --repeats=1 --profile=/tmp/prof_small ;;
  scan)  # compile time and speed with the layers scanned (issue 9), 1 GPU and 2
    run CUDA_VISIBLE_DEVICES=0 $bench --config.training.batch_size=16 --config.model.scan_layers=true
    run $bench --config.training.batch_size=32 --config.model.scan_layers=true ;;
  run)  # the whole loop on 2 GPUs (guide's GPU config, 2.38M-token corpus): 2 epochs, then resumed on 1 GPU
    common="--config=configs/gpu.py --config.data.data_dir=.gpu/wikitext-2-x5 --config.workdir=/tmp/run2"
    run python3 -m jaxlm.main $common --config.training.epochs=2 --config.training.num_steps=$((3 * 580))
    run CUDA_VISIBLE_DEVICES=0 python3 -m jaxlm.main $common --config.training.epochs=3 --config.training.num_steps=$((3 * 580))
    cp /tmp/run2/metrics.jsonl $OUT/run2_metrics.jsonl ;;
  esac
done
