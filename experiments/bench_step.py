"""Times jaxlm's training step, one JSON line per variant, comparable with the PyTorch baseline's
`train.py --bench-steps` (same model, batch, sequence length and vocabulary; random tokens unless
--tokens_npy is given). Model and state come from `train.setup` and `train.init_state`, as in a run:
over every device, as config mesh.* lays them out (training.batch_size is the global batch; tokens/s
are the mesh's).

Variants (--modes):
  step   the jitted `train_step` on batches already on the device: the bare step
  calls  what `python -m jaxlm.main` runs: `train.compile_train_steps` with --steps_per_call updates per
         call, each gathering its batch on the device from a device-resident token array

  python experiments/bench_step.py --config=configs/base.py --steps=50
  python experiments/bench_step.py --config=configs/base.py --modes=step,calls --steps_per_call=1,16
  python experiments/bench_step.py --config=configs/base.py --config.training.batch_size=32 --matmul
  python experiments/bench_step.py ... --profile=/tmp/trace   # + the device's busiest kernels
  python experiments/bench_step.py ... --config.mesh.fsdp=2     # 2 GPUs, parameters sharded
"""
import collections
import glob
import gzip
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import sharding as sharding_lib
from jaxlm import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
_STEPS = flags.DEFINE_integer("steps", 50, "timed steps (rounded up to a multiple of each steps_per_call)")
_WARMUP = flags.DEFINE_integer("warmup", 5, "untimed calls first, after compiling")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "vocabulary of the random tokens")
_TOKENS = flags.DEFINE_string("tokens_npy", "", "bench on this token array instead of random tokens")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats; the median is reported")
_MODES = flags.DEFINE_list("modes", ["step"], "step and/or calls (see the docstring)")
_PER_CALL = flags.DEFINE_list("steps_per_call", ["1"], "for --modes=calls: steps per jitted call")
_MATMUL = flags.DEFINE_bool("matmul", False, "also time a large matmul in the compute dtype (the chip's rate)")
_PROFILE = flags.DEFINE_string("profile", "", "trace one timed repeat of each variant into this directory "
                               "and print the kernels with the most device time")
_KERNELS = flags.DEFINE_integer("profile_kernels", 15, "with --profile: how many kernels to print")


def token_pool(config, num_seqs: int) -> np.ndarray:
  L = config.data.seq_length
  if not _TOKENS.value:
    return np.random.default_rng(0).integers(0, _VOCAB.value, (num_seqs, L), dtype=np.int32)
  tokens = np.load(_TOKENS.value)
  seqs = tokens[: len(tokens) // L * L].reshape(-1, L)
  return seqs[np.arange(num_seqs) % len(seqs)].astype(np.int32)


def make_variant(s: train_lib.Setup, mode: str, k: int, num_calls: int):
  """(compile seconds, call(state, i) -> (state, metrics) running call i)."""
  B = s.config.training.batch_size
  pool = token_pool(s.config, num_calls * k * B)
  replicated, batch = sharding_lib.replicated(s.mesh), sharding_lib.batch(s.mesh)
  if mode == "step":
    batches = [sharding_lib.put(pool[i * B:(i + 1) * B], batch) for i in range(num_calls)]
    fn = jax.jit(lambda st, b: train_lib.train_step(st, b, s.schedule, s.loss_chunk),
                 in_shardings=(s.state_shardings, batch), out_shardings=(s.state_shardings, replicated),
                 donate_argnums=train_lib.donate_state(s.device))
    t0 = time.perf_counter()
    compiled = fn.lower(s.abstract_state, batches[0]).compile(s.compiler_options)
    return time.perf_counter() - t0, lambda st, i: compiled(st, batches[i])
  seqs, order = sharding_lib.put(pool, replicated), sharding_lib.put(np.arange(len(pool), dtype=np.int32), replicated)
  program, compile_s = train_lib.compile_train_steps(s, s.abstract_state, seqs, order, k)
  return compile_s, lambda st, i: program(st, seqs, order, np.int32(i * k))


def matmul_flops(dtype) -> float:
  """FLOP/s of a large square matmul in `dtype` (2048 on a CPU, 8192 elsewhere), median of 5."""
  n = 2048 if jax.devices()[0].platform == "cpu" else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def _union(intervals: list) -> list:
  """Sorted, merged [start, end) intervals."""
  merged = []
  for a, b in sorted(intervals):
    if merged and a <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], b)
    else:
      merged.append([a, b])
  return merged


def _covered(spans: list, cover: list) -> float:
  """Length of the merged `spans` that the merged `cover` overlaps."""
  total, j = 0.0, 0
  for a, b in spans:
    while j < len(cover) and cover[j][1] <= a:
      j += 1
    k = j
    while k < len(cover) and cover[k][0] < b:
      total += min(b, cover[k][1]) - max(a, cover[k][0])
      k += 1
  return total


def top_kernels(trace_dir: str, steps: int, count: int = 15) -> list:
  """Rows of the trace's perfetto file, per step: first the totals over every GPU ("all N kernels":
  device-busy microseconds), then per GPU the wall time its kernels span, the time any kernel runs,
  and the collectives' (NCCL) time that no other kernel overlaps ("exposed"), then the `count`
  kernels with the most device time, each with its launches per step."""
  (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[-1:]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  gpu_pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M"
              and e.get("name") == "process_name" and "/device:" in e["args"].get("name", "")
              and "CPU" not in e["args"]["name"]}
  times, calls = collections.Counter(), collections.Counter()
  spans = collections.defaultdict(lambda: ([], []))  # pid -> (compute, collective) intervals
  for e in events:
    if e.get("ph") == "X" and e["pid"] in gpu_pids:
      times[e["name"][:80]] += e["dur"]
      calls[e["name"][:80]] += 1
      spans[e["pid"]]["nccl" in e["name"].lower()].append((e["ts"], e["ts"] + e["dur"]))
  total = sum(times.values()) or 1
  rows = [(f"all {sum(calls.values()) / steps:.0f} kernels per step", round(total / steps, 1), 1.0, None)]
  for pid, (compute, collective) in sorted(spans.items()):
    busy, comm = _union(compute + collective), _union(collective)
    comm_us = sum(b - a for a, b in comm)
    exposed = comm_us - _covered(comm, _union(compute))
    rows.append((f"{gpu_pids[pid]}: span {(busy[-1][1] - busy[0][0]) / steps:.0f} us, busy "
                 f"{sum(b - a for a, b in busy) / steps:.0f} us, collectives {comm_us / steps:.0f} us "
                 f"of which exposed", round(exposed / steps, 1), None, None))
  return rows + [(name, round(us / steps, 1), round(us / total, 3), round(calls[name] / steps, 1))
                 for name, us in times.most_common(count)]


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  s = train_lib.setup(config, _VOCAB.value, num_steps=10_000)
  B, L = config.training.batch_size, config.data.seq_length
  flops, rate = s.flops_per_token, None
  if _MATMUL.value:
    with jax.default_device(s.device):
      rate = matmul_flops(s.dtype)
  variants = [("step", 1)] if "step" in _MODES.value else []
  variants += [("calls", int(k)) for k in _PER_CALL.value] if "calls" in _MODES.value else []
  for mode, k in variants:
    calls = -(-_STEPS.value // k)
    with jax.default_device(s.device):
      compile_s, call = make_variant(s, mode, k, _WARMUP.value + calls)
      state = train_lib.init_state(s)  # each variant its own (donated on accelerators)
      for i in range(_WARMUP.value):
        state, m = call(state, i)
      jax.block_until_ready(state)  # not m: with --warmup=0 there is none yet
      times = []
      for r in range(_REPEATS.value + bool(_PROFILE.value)):
        tracing = _PROFILE.value and r == _REPEATS.value
        if tracing:
          jax.profiler.start_trace(f"{_PROFILE.value}/{mode}{k}", create_perfetto_trace=True)
        t0 = time.perf_counter()
        for i in range(_WARMUP.value, _WARMUP.value + calls):
          state, m = call(state, i)
        jax.block_until_ready(m)
        if tracing:
          jax.profiler.stop_trace()
        else:
          times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    steps = calls * k
    tokens_per_s = steps * B * L / dt
    peak = s.peak_flops
    if s.device.platform == "gpu":
      peak_mem = s.device.memory_stats().get("peak_bytes_in_use", 0) / 2**20
    else:
      peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(
        impl="jaxlm", mode=mode, steps_per_call=k, device=s.device.platform, device_name=s.device.device_kind,
        devices=s.mesh.size, mesh=dict(s.mesh.shape), per_device_batch=B // s.mesh.size,
        dtype=jnp.dtype(s.dtype).name, attention=s.model.attention, loss_chunk=s.loss_chunk,
        gpu_matmuls=s.gpu_matmuls, batch_size=B, seq_length=L,
        d_model=config.model.d_model, num_layers=config.model.num_layers, vocab_size=_VOCAB.value,
        params=s.num_params, steps=steps, ms_per_step=round(1000 * dt / steps, 3),
        tokens_per_s=round(tokens_per_s, 1), model_tflops=round(tokens_per_s * flops / 1e12, 3),
        mfu=round(metrics_lib.mfu(tokens_per_s, flops, peak), 4) if peak else None,
        matmul_tflops=round(rate / 1e12, 3) if rate else None,
        of_matmul=round(tokens_per_s * flops / rate, 3) if rate else None,
        spread=round((max(times) - min(times)) / dt, 3), compile_s=round(compile_s, 2),
        final_loss=round(float(np.asarray(m["loss"].addressable_data(0)).reshape(-1)[-1]), 4),
        peak_mem_mb=round(peak_mem, 1),
        jax=jax.__version__, host=platform.node())), flush=True)
    if _PROFILE.value:
      for row in top_kernels(f"{_PROFILE.value}/{mode}{k}", steps, _KERNELS.value):
        print(json.dumps({"kernel": row[0], "us_per_step": row[1], "share": row[2], "per_step": row[3]}),
              flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
