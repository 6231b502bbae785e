#!/usr/bin/env bash
# Issue 9's GPU measurements in one call of the device tool (see experiments/README.md, "Speed"):
#   bash experiments/gpu_speed.sh loop|attention|final|xlaflags|decide|dropout|kernels|cudnn|layout|posgrad|positions|stepscan|unroll|percall20|runprofile|syncs|logahead|evalcalls|evalfinal|saveorder|check|compress|gelu|blocked|recheck|gpt2percall|scan|gpt2|torch|train|percall
#   ... (in the order given)
# Expects the GPU image's missing wheels in .whl/, the baseline in .gpu/torch_ref/, and the 2.38M-token
# corpus (wikitext-2-mini's train split 5x) in .gpu/wikitext-2-x5 with its tokenized cache in data/.
# One JSON line per measurement on stdout; the runs' metrics files go to $OUT. The corpus, made here:
#   mkdir -p .gpu/wikitext-2-x5 && cp ../shared/data/wikitext-2-mini/{validation,test}.txt .gpu/wikitext-2-x5/
#   for i in 1 2 3 4 5; do cat ../shared/data/wikitext-2-mini/train.txt; done > .gpu/wikitext-2-x5/train.txt
#   python -m jaxlm.data --config=configs/base.py --config.data.data_dir=.gpu/wikitext-2-x5
# then carry .whl, .gpu and data (device tool's `carry`).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench="python3 experiments/bench_step.py --config=configs/base.py --vocab_size=8192"
gpu="--config.training.batch_size=32 --config.model.d_model=512 --config.model.num_layers=6 \
     --config.model.num_heads=8 --config.model.d_ff=2048"
train="python3 -m jaxlm.main --config=configs/base.py --config.data.data_dir=.gpu/wikitext-2-x5 \
       --config.sample.max_new_tokens=48"
gpt2="--config.training.batch_size=16 --config.data.seq_length=1024 --config.model.d_model=768 \
      --config.model.num_layers=12 --config.model.num_heads=12 --config.model.d_ff=3072 --vocab_size=32768"
# The GPU config as a run calls it (16 steps per call), and the GPT-2-small shape, as most sections time them
gpu16="$bench $gpu --modes=calls --steps_per_call=16 --steps=320"
gpt2_20="$bench $gpt2 --steps=20 --modes=calls"
# The PyTorch baseline (torch.compile + bf16) at the GPT-2-small shape
torch_gpt2="python3 .gpu/torch_ref/train.py --bench-steps 20 --vocab-size 32768 --batch-size 16 --seq-length 1024 \
            --dim-model 768 --num-layers 12 --num-heads 12 --dim-ff 3072 --tf32 --compile --bf16"
mkdir -p $OUT
tree() {  # NAME SOURCE...: another version of the code (SOURCE... holding jaxlm, configs, experiments)
          # copied to /tmp/v_NAME, with this checkout's .gpu and data linked in
  local name=$1; shift
  rm -rf /tmp/v_$name; mkdir /tmp/v_$name; cp -r "$@" /tmp/v_$name/; ln -s $PWD/.gpu $PWD/data /tmp/v_$name/
}
variant() {  # NAME SED_EXPR COMMAND...: a copy of the tree with model.py and train.py edited runs
              # COMMAND with its compiled programs dumped; then the train step's transpose fusions
              # and its lines holding an f32[$LDB] (a float32 [L, D, B] array: "f32_LDB_arrays")
  local name=$1 expr=$2; shift 2
  tree $name jaxlm configs experiments; rm -rf /tmp/hlo_$name
  if [ -n "$expr" ]; then
    sed -i "$expr" /tmp/v_$name/jaxlm/model.py /tmp/v_$name/jaxlm/train.py
    if git diff --no-index --quiet jaxlm /tmp/v_$name/jaxlm; then
      echo "$name: the edit changed nothing" | tee -a $OUT/log.txt; return
    fi
  fi
  (cd /tmp/v_$name && git diff --no-index --stat $OLDPWD/jaxlm jaxlm | tail -1 | tee -a $OUT/log.txt
   run env PYTHONPATH=/tmp/site:/tmp/v_$name XLA_FLAGS="--xla_dump_to=/tmp/hlo_$name --xla_dump_hlo_as_text" "$@")
  m=$(ls -S /tmp/hlo_$name/*train_steps*after_optimizations.txt 2>/dev/null | head -1)
  [ -f "$m" ] || { echo "no dump of $name's train step" | tee -a $OUT/log.txt; return; }
  echo "{\"variant\": \"$name\", \"transpose_fusions\": $(grep -cE '^\s+%[a-z_]*transpose[a-z_.0-9]* = .*fusion\(' "$m"), \"f32_LDB_arrays\": $(grep -c "f32\\[$LDB\\]" "$m")}" | tee -a $OUT/log.txt
}
run() { echo "## $*" | tee -a $OUT/log.txt; timeout 300 "$@" > /tmp/run.log 2>&1
        grep -E '^\{|^compiled|^epoch|^test|^model|^devices|Error|error' /tmp/run.log | tee -a $OUT/log.txt; }
for section in "$@"; do
  case $section in
  loop)  # the bare step against the run's calls of k steps gathering on the device
    run $bench --modes=step,calls --steps_per_call=1,10,20 --steps=800
    run $bench $gpu --modes=step,calls --steps_per_call=1,4,16 --steps=320 --matmul --profile=/tmp/prof_gpu
    run $gpu16 --config.model.dropout=0.0 ;;
  attention)  # XLA's against cuDNN's attention at 128-1024 tokens, 4,096 tokens per batch
    for L in 128 256 512; do
      for a in xla cudnn; do
        run $bench $gpu --config.data.seq_length=$L --config.training.batch_size=$((4096 / L)) \
          --config.model.attention=$a --steps=200
      done
    done ;;
  xlaflags)  # XLA's GEMM choices and effort levels on the GPT-2-small shape and the GPU config
             # (--xla_gpu_exhaustive_tiling_search=true was tried: it compiles for over 5 minutes)
    run $gpt2_20
    run env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $gpt2_20
    run env JAX_OPTIMIZATION_LEVEL=O1 $gpt2_20
    run $gpu16
    run env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $gpu16
    run $gpt2_20 ;;
  decide)  # both open levers in one call, each against the default twice (first and last), so that a
           # drift shows: cuBLAS for every matmul (triton_gemm off) and the chunked loss, alone and together
    nt="env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
    run $gpt2_20
    run $nt $gpt2_20
    run $gpt2_20 --config.training.loss_chunk=16384
    run $nt $gpt2_20 --config.training.loss_chunk=16384
    run $gpt2_20
    run $gpu16
    run $nt $gpu16
    run $gpu16 --config.training.loss_chunk=1024
    run $gpu16 ;;
  dropout)  # flax's threefry masks against the hashed ones (model.Dropout) and no dropout, alternating
    d="python3 experiments/bench_variants.py --config=configs/base.py --vocab_size=8192 --rounds=5 --variants=threefry_dropout,now,no_dropout"
    run $d $gpt2 --steps=20 --modes=calls
    run $d $gpu --modes=calls --steps_per_call=16 --steps=320 ;;
  final)  # the defaults, back to back with the baseline's torch.compile + bf16
    run $bench $gpt2 --steps=20 --modes=step,calls --steps_per_call=1
    run $bench $gpu --modes=step,calls --steps_per_call=16 --steps=320
    run $bench --modes=calls --steps_per_call=10 --steps=800 ;;
  kernels)  # where the GPU config's step goes: every kernel of a scanned call (16 steps) profiled;
            # CUDA graphs over the scan's loop too (WHILE and CONDITIONAL in XLA's command buffers);
            # scan over layers (fewer, stacked parameters for the optimizer); the defaults last again
    run $gpu16 --profile=/tmp/prof_kernels --profile_kernels=120
    run env XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL $gpu16
    run $gpu16 --config.model.scan_layers=true
    run $gpu16 ;;
  cudnn)  # the GPU config (128 tokens) with cuDNN's attention against XLA's, alternated, now that the
          # dropout masks are hashed; cuDNN's kernels profiled; XLA's compiled program dumped (its
          # transposes); then a whole 3-epoch run with cuDNN's attention
    cu=--config.model.attention=cudnn
    run $gpu16
    run $gpu16 $cu --profile=/tmp/prof_cudnn --profile_kernels=40
    run $gpu16
    run $gpu16 $cu
    run env XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" $gpu16 --steps=32 --repeats=1
    tar -czf $OUT/hlo.tgz $(ls -S /tmp/hlo/*after_optimizations.txt | head -2)
    run $train $gpu $cu --config.workdir=/tmp/runs/gpu_cudnn
    cp /tmp/runs/gpu_cudnn/metrics.jsonl $OUT/train_gpu_cudnn_metrics.jsonl ;;
  layout)  # XLA lays the GPU config's float32 residual stream out as [L, D, B] (the cudnn section's HLO
           # dump; the 127 transposes take it to [B, L, D] for the matmuls and back). Which of our
           # choices leads it there: the step (16 per call) and its program's transpose fusions with
           # dropout off, with rotary positions (no position embedding added), with jnp.take's clip
           # mode (no out-of-range mask) in the embedding lookup and the batch gather, and that with
           # the dropout hash's index as one reshaped iota; each a patched copy of the tree in
           # /tmp/v_NAME; the defaults first and last; then a whole run of the last patch
    clip='s/jnp.take(embedding_VD, tokens_BL, axis=0)/jnp.take(embedding_VD, tokens_BL, axis=0, mode="clip")/; s/jnp.take(seqs_NL, rows_B, axis=0)/jnp.take(seqs_NL, rows_B, axis=0, mode="clip")/'
    iota='s/index = sum(jax.lax.broadcasted_iota.*/index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)/; /for d in range(len(shape)))$/d'
    LDB=128,512,32
    variant default "" $gpu16
    variant nodrop "" $gpu16 --config.model.dropout=0.0
    variant rope "" $gpu16 --config.model.positions=rope
    variant clip "$clip" $gpu16
    variant clip_iota "$clip;$iota" $gpu16
    variant default2 "" $gpu16
    (cd /tmp/v_clip_iota && run env PYTHONPATH=/tmp/site:/tmp/v_clip_iota $train $gpu --config.workdir=/tmp/runs/clip_iota)
    cp /tmp/runs/clip_iota/metrics.jsonl $OUT/train_gpu_clip_iota_metrics.jsonl ;;
  posgrad)  # the layout section found the transposes gone with rotary positions (127 -> 24, 3.634
            # against 3.875 ms): the learned position embedding's gradient, a sum of the residual's
            # over the batch, is what XLA lays out [L, D, B] for. Two other gradients for it: the
            # lookup as a gather of [B, L] positions (as decoding does; a scatter-add), and the
            # broadcast over the batch as an outer product with ones (a dot contracting the batch);
            # the GPU config and the GPT-2-small shape, each against the defaults first and last.
            # Its edits are of ac173a9's model.py: they match nothing since 021161d made the gather the code
    take='s/pos_BLD = pos_emb_PD\[None, :L\] if positions_BL is None else jnp.take(pos_emb_PD, positions_BL, axis=0)/pos_BLD = jnp.take(pos_emb_PD, jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BL is None else positions_BL, axis=0, mode="clip")/'
    ones='s/pos_BLD = pos_emb_PD\[None, :L\] if/pos_BLD = jnp.einsum("b,ld->bld", jax.lax.optimization_barrier(jnp.ones((B,), jnp.float32)), pos_emb_PD[:L].astype(jnp.float32)) if/'
    LDB=128,512,32
    variant default "" $gpu16
    variant take "$take" $gpu16
    variant ones "$ones" $gpu16
    variant default2 "" $gpu16
    LDB=1024,768,16
    variant gpt2 "" $gpt2_20
    variant gpt2_take "$take" $gpt2_20
    variant gpt2_ones "$ones" $gpt2_20
    variant gpt2_2 "" $gpt2_20 ;;
  positions)  # after posgrad's gather became the default: the GPU config's kernels profiled, then with
              # cuDNN's attention, no dropout, cuBLAS for every matmul, and the defaults again
    run $gpu16 --profile=/tmp/prof_positions --profile_kernels=60
    run $gpu16 --config.model.attention=cudnn
    run $gpu16 --config.model.dropout=0.0
    run env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $gpu16
    run $gpu16 ;;
  stepscan)  # the positions section's GPU config ran its bare step in 3.302 ms and 16 scanned steps per
             # call in 3.553 ms (3.83 against 3.88 before the gather): both profiled (every kernel) and
             # dumped, then the scanned call with XLA's while-loop double buffering, with copy insertion's
             # region analysis, and with the scan unrolled by 2 (an edit that matches nothing since
             # 021161d made two steps per iteration the code); cuDNN's attention against XLA's again
    run env XLA_FLAGS="--xla_dump_to=/tmp/hlo_sc --xla_dump_hlo_as_text" $bench $gpu --modes=step,calls \
      --steps_per_call=16 --steps=320 --profile=/tmp/prof_sc --profile_kernels=700
    tar -czf $OUT/hlo_stepscan.tgz $(ls -S /tmp/hlo_sc/*after_optimizations.txt | head -3)
    LDB=128,512,32
    run env XLA_FLAGS=--xla_gpu_enable_while_loop_double_buffering=true $gpu16
    run env XLA_FLAGS=--xla_gpu_copy_insertion_use_region_analysis=true $gpu16
    variant unroll2 's/jax.lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32))/jax.lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32), unroll=2)/' $gpu16
    run $gpu16 --config.model.attention=cudnn
    run $gpu16 ;;
  unroll)  # two steps per iteration of the scanned call (the default since stepscan) against one and
           # four, each followed by the defaults; whole runs of the GPU config with XLA's attention and
           # with cuDNN's (0.8% faster in stepscan), and of the base config (batch 2, 2 epochs)
    LDB=128,512,32
    variant unroll1 's/, unroll=2)/)/' $gpu16
    run $gpu16
    variant unroll4 's/, unroll=2)/, unroll=4)/' $gpu16
    run $gpu16
    run $train $gpu --config.workdir=/tmp/runs/unroll_gpu
    run $train $gpu --config.model.attention=cudnn --config.workdir=/tmp/runs/unroll_gpu_cudnn
    run $train --config.training.epochs=2 --config.workdir=/tmp/runs/unroll_base
    for r in gpu gpu_cudnn base; do cp /tmp/runs/unroll_$r/metrics.jsonl $OUT/train_${r}_metrics.jsonl; done ;;
  percall20)  # whole 2-epoch runs of the GPU config at 20 steps per call, then at auto (10): the scan's
              # body is two steps whatever the call's length, so a longer call adds little compile
    run $train $gpu --config.training.epochs=2 --config.training.steps_per_call=20 --config.workdir=/tmp/runs/gpu_20
    run $train $gpu --config.training.epochs=2 --config.workdir=/tmp/runs/gpu_10
    for r in gpu_20 gpu_10; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_${r}_metrics.jsonl; done ;;
  runprofile)  # where a whole run's epoch goes: epoch 2 of a 2-epoch GPU-config run traced (idle gaps
               # between kernels, the host's work during them); then the bench at the run's 10 steps per
               # call on random tokens and on the run's own (a scatter-add of frequent tokens' rows)
    run python3 experiments/profile_run.py --config=configs/base.py --config.data.data_dir=.gpu/wikitext-2-x5 \
      --config.sample.max_new_tokens=48 $gpu --config.training.epochs=2 --config.workdir=/tmp/runs/prof \
      --trace_epoch=2 --trace_dir=/tmp/trace_run
    cp /tmp/runs/prof/metrics.jsonl $OUT/train_gpu_profiled_metrics.jsonl
    run $bench $gpu --modes=calls --steps_per_call=10 --steps=580
    run $bench $gpu --modes=calls --steps_per_call=10 --steps=580 \
      --tokens_npy=$(ls data/processed/wikitext-2-x5-bpe8192-*/train.npy) ;;
  logahead)  # whole 3-epoch GPU-config runs, the code before (acf4037, unpacked in .gpu/tree_old:
             # `git archive acf4037 jaxlm configs | tar -x -C .gpu/tree_old`) against now (a log line
             # fetched once the next call is queued), alternated; then the GPT-2-small shape at 1 and 2
             # steps per call, and torch.compile's at that shape
    tree old .gpu/tree_old/*
    for i in 1 2; do
      (cd /tmp/v_old && run env PYTHONPATH=/tmp/site:/tmp/v_old $train $gpu --config.workdir=/tmp/runs/old$i)
      run $train $gpu --config.workdir=/tmp/runs/new$i
    done
    for r in old1 new1 old2 new2; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_gpu_${r}_metrics.jsonl; done
    run $gpt2_20 --steps_per_call=1,2
    run $torch_gpt2 ;;
  evalcalls)  # (run with validation's calls a loop over a count of batches, not kept: see `evalfinal`)
              # validation in calls of 16 batches (now) against one batch per call (f7a4c64, unpacked in
              # .gpu/tree_old: `git archive f7a4c64 jaxlm configs experiments | tar -x -C .gpu/tree_old`) and
              # now with `best` saved in the background too (its wait dropped: what the two saves' writes
              # behind the next epoch cost it); whole 3-epoch GPU-config runs alternated, each method's
              # wall time per epoch (profile_run, epoch 3 traced); one compilation cache for all, so that
              # only the first compiles the (identical) training program
    export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
    tree old .gpu/tree_old/*; tree bgbest jaxlm configs experiments
    sed -i 's/self.save("best", wait=True, /self.save("best", /' /tmp/v_bgbest/jaxlm/run.py
    git diff --no-index --stat jaxlm /tmp/v_bgbest/jaxlm | tail -1 | tee -a $OUT/log.txt
    prof="python3 experiments/profile_run.py ${train#python3 -m jaxlm.main} $gpu --config.training.epochs=3 --trace_epoch=3"
    for i in 1 2; do
      for t in old new bgbest; do
        d=$PWD; [ $t = new ] || d=/tmp/v_$t
        (cd $d && run env PYTHONPATH=/tmp/site:$d $prof --trace_dir=/tmp/trace_$t$i --config.workdir=/tmp/runs/$t$i)
        cp /tmp/runs/$t$i/metrics.jsonl $OUT/train_gpu_evalcalls_$t${i}_metrics.jsonl
      done
    done
    unset JAX_COMPILATION_CACHE_DIR ;;
  evalfinal)  # whole 4-epoch GPU-config runs, the code before (f7a4c64 in .gpu/tree_old, as for `evalcalls`) and
              # now (validation's batches in a scan of up to 16 per call), alternated; now's runs use
              # the default compile cache (config.compile_cache_dir, empty on a fresh machine: the
              # first compiles, the second loads), the old code's one of their own; then the base config
    tree old .gpu/tree_old/*
    for i in 1 2; do
      (cd /tmp/v_old && run env PYTHONPATH=/tmp/site:/tmp/v_old JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache_old \
         $train $gpu --config.training.epochs=4 --config.workdir=/tmp/runs/old$i)
      run $train $gpu --config.training.epochs=4 --config.workdir=/tmp/runs/new$i
    done
    ls ~/.cache/jaxlm/xla | grep -c . | sed 's/^/programs in the default compile cache: /' | tee -a $OUT/log.txt
    run $train --config.training.epochs=2 --config.workdir=/tmp/runs/base
    for r in old1 new1 old2 new2 base; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_gpu_evalfinal_${r}_metrics.jsonl; done ;;
  saveorder)  # an improving epoch's saves: `best` written and waited for, then `last` (3aa894d, unpacked in
              # .gpu/tree_prev: `git archive 3aa894d jaxlm configs experiments | tar -x -C .gpu/tree_prev`)
              # against `last`, then `best`, both in the background (the tree with
              # results/2026-11-30_saveorder_not_kept.patch applied; not kept); whole 4-epoch GPU-config
              # runs alternated, each method's wall time per epoch (profile_run, the last epoch traced)
    tree prev .gpu/tree_prev/*
    prof="python3 experiments/profile_run.py ${train#python3 -m jaxlm.main} $gpu --config.training.epochs=4 --trace_epoch=4"
    for i in 1 2; do
      (cd /tmp/v_prev && run env PYTHONPATH=/tmp/site:/tmp/v_prev $prof --trace_dir=/tmp/trace_prev$i \
         --config.workdir=/tmp/runs/prev$i)
      run $prof --trace_dir=/tmp/trace_now$i --config.workdir=/tmp/runs/now$i
    done
    for r in prev1 now1 prev2 now2; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_gpu_saveorder_${r}_metrics.jsonl; done ;;
  compress)  # (not kept) orbax's zstd compression of the checkpoints (its default) against none, whole 3-epoch GPU-config
             # runs alternated, each method's wall time per epoch (profile_run; the saves of an improving
             # epoch are `best`, written and waited for, and `last`), and the checkpoints' size on disk
    tree raw jaxlm configs experiments
    sed -i 's/"state": ocp.PyTreeCheckpointHandler()/"state": ocp.PyTreeCheckpointHandler(use_compression=False)/' \
      /tmp/v_raw/jaxlm/checkpoint.py
    git diff --no-index --stat jaxlm /tmp/v_raw/jaxlm | tail -1 | tee -a $OUT/log.txt
    prof="python3 experiments/profile_run.py ${train#python3 -m jaxlm.main} $gpu --config.training.epochs=3 --trace_epoch=3"
    for i in 1 2; do
      run $prof --trace_dir=/tmp/trace_zstd$i --config.workdir=/tmp/runs/zstd$i
      (cd /tmp/v_raw && run env PYTHONPATH=/tmp/site:/tmp/v_raw $prof --trace_dir=/tmp/trace_raw$i --config.workdir=/tmp/runs/raw$i)
    done
    du -sm /tmp/runs/{zstd,raw}1/checkpoints/{best,last} | tee -a $OUT/log.txt
    for r in zstd1 raw1 zstd2 raw2; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_gpu_compress_${r}_metrics.jsonl; done ;;
  check)  # the code as committed (ff37f64), end to end: a 4-epoch GPU-config run (`jaxlm.evaluate` on a
          # local folder reads it through `datasets`, which the GPU image lacks: not run there)
    run $train $gpu --config.training.epochs=4 --config.workdir=/tmp/runs/check
    cp /tmp/runs/check/metrics.jsonl $OUT/train_gpu_check_metrics.jsonl ;;
  gelu)  # GELU through erf (model.gelu) against jax.nn.gelu's erfc, compiled in one process and
         # alternated, at the GPU config (16 steps per call) and the GPT-2-small shape (both exact GELU);
         # then the committed code end to end: a 4-epoch GPU-config run
    v="python3 experiments/bench_variants.py --config=configs/base.py --vocab_size=8192 --rounds=6 --variants=now,gelu_erfc"
    run $v $gpu --modes=calls --steps_per_call=16 --steps=320
    run $v $gpt2 --modes=calls --steps=20
    run $train $gpu --config.training.epochs=4 --config.workdir=/tmp/runs/gelu
    cp /tmp/runs/gelu/metrics.jsonl $OUT/train_gpu_gelu_metrics.jsonl ;;
  blocked)  # attention by blocks of queries (model.causal_attention_by_blocks, a CPU's auto since
           # 2026-12-01) against XLA's fused attention (a GPU's auto below 256 tokens) and cuDNN's,
           # compiled in one process and alternated: the GPU config (16 steps per call), batch 2 (10
           # per call) and the GPT-2-small shape; then a 4-epoch GPU-config run with blocked attention
    v="python3 experiments/bench_variants.py --config=configs/base.py --vocab_size=8192 --rounds=6"
    run $v $gpu --modes=calls --steps_per_call=16 --steps=320 --variants=xla_attention,blocked_attention
    run $v --modes=calls --steps_per_call=10 --steps=800 --variants=xla_attention,blocked_attention
    run $v $gpt2 --modes=calls --steps=20 --variants=now,xla_attention,blocked_attention
    run $train $gpu --config.training.epochs=4 --config.model.attention=blocked --config.workdir=/tmp/runs/blocked
    cp /tmp/runs/blocked/metrics.jsonl $OUT/train_gpu_blocked_metrics.jsonl ;;
  recheck)  # the code as committed, end to end, twice more: 4-epoch GPU-config runs
    for i in 1 2; do
      run $train $gpu --config.training.epochs=4 --config.workdir=/tmp/runs/recheck$i
      cp /tmp/runs/recheck$i/metrics.jsonl $OUT/train_gpu_recheck${i}_metrics.jsonl
    done ;;
  gpt2percall)  # the GPT-2-small shape at 1 and 2 steps per call, alternated, then torch.compile's at that shape
    run $gpt2_20 --steps_per_call=1,2,1,2
    run $torch_gpt2 ;;
  syncs)  # the run's steps take 3.43-3.54 ms against the bench's 3.30-3.34: whole 2-epoch
          # GPU-config runs logging every 100 steps (host syncs at five log lines and the epoch's end)
          # and every 580 (the epoch's end alone); then the base config at batch 2, 10 steps per call, with one step per scan
          # iteration against two (the default), alternated
    run $train $gpu --config.training.epochs=2 --config.workdir=/tmp/runs/log100
    run $train $gpu --config.training.epochs=2 --config.training.log_every_steps=580 --config.workdir=/tmp/runs/log580
    for r in log100 log580; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_gpu_${r}_metrics.jsonl; done
    LDB=128,256,2
    b2="$bench --modes=calls --steps_per_call=10 --steps=800"
    variant b2_unroll1 's/, unroll=2)/)/' $b2
    run $b2
    variant b2_unroll1_again 's/, unroll=2)/)/' $b2
    run $b2 ;;
  scan)  # scan over layers: compile time and step time of the GPT-2-small shape and the GPU config
    run $bench $gpt2 --steps=20 --modes=calls --config.model.scan_layers=false
    run $bench $gpt2 --steps=20 --modes=calls --config.model.scan_layers=true
    run $bench $gpu --steps=320 --modes=calls --config.model.scan_layers=true ;;
  gpt2)  # the GPT-2-small shape
    run $bench $gpt2 --config.model.attention=xla --steps=20
    run $bench $gpt2 --config.model.attention=cudnn --steps=20 --profile=/tmp/prof_gpt2
    run $bench $gpt2 --config.model.attention=cudnn --config.model.dropout=0.0 --steps=20 ;;
  torch)  # the PyTorch baseline, torch.compile + bf16
    run python3 .gpu/torch_ref/train.py --bench-steps 100 --vocab-size 8192 --batch-size 32 --dim-model 512 \
      --num-layers 6 --num-heads 8 --dim-ff 2048 --tf32 --compile --bf16
    run $torch_gpt2 ;;
  train)  # whole runs on the 2.38M-token train split: the GPU config (3 epochs), the base config, batch 2
    run $train $gpu --config.workdir=/tmp/runs/gpu
    run $train --config.training.epochs=2 --config.workdir=/tmp/runs/base
    for r in gpu base; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_${r}_metrics.jsonl; done ;;
  percall)  # whole GPU-config runs, 3 epochs: steps per call auto (10) against one per call
    run $train $gpu --config.workdir=/tmp/runs/gpu_auto
    run $train $gpu --config.training.steps_per_call=1 --config.workdir=/tmp/runs/gpu_1
    for r in gpu_auto gpu_1; do cp /tmp/runs/$r/metrics.jsonl $OUT/train_${r}_metrics.jsonl; done ;;
  esac
done
