"""jaxlm's training step against the PyTorch baseline's, both in this one process and timed in
alternating rounds, so that the machine's drift (large on a shared 2-core VM: the same step varies
by 20-50% over minutes) falls on both alike. Each round runs --steps steps of jaxlm's bare step
(bench_step.py's `step` mode) and --steps of the baseline's `train_step` on the same model shape,
batch, vocabulary and dropout (random tokens, float32, its default threads), in turns (jaxlm first
in even rounds, PyTorch first in odd ones); one JSON line per round and a last line with the
medians. `jaxlm_over_torch` is a speed ratio: PyTorch's ms per step over jaxlm's. CPU only, and only
configs the baseline can express (tied head, learned positions, exact GELU, no attention or token
dropout, no EMA). Needs torch in this environment and the baseline's train.py:

  pip install torch==2.13.0   # the CPU build, from this workplace's local disk
  python experiments/bench_vs_torch.py --config=configs/base.py --torch_ref=../shared/bench/torch_ref/train.py \
      --steps=30 --rounds=12
  python experiments/bench_vs_torch.py ... --config.training.batch_size=32 --steps=6 --rounds=8
"""
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bench_step
from jaxlm import train as train_lib

_TORCH_REF = flags.DEFINE_string("torch_ref", "../shared/bench/torch_ref/train.py", "the baseline's train.py")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "alternating rounds of --steps steps each")


def unlike_the_baseline(s: train_lib.Setup) -> list:
  """What in `s` the baseline's step does not do (empty: the two steps are the same model's)."""
  m, t = s.config.model, s.config.training
  checks = {"a CPU": s.device.platform == "cpu", "float32": s.dtype == jnp.float32,
            "model.tie_embeddings=True": m.tie_embeddings, "model.positions=learned": m.positions == "learned",
            "model.activation=gelu": m.activation == "gelu", "model.attention_dropout=0": not m.attention_dropout,
            "model.token_dropout=0": not m.token_dropout, "training.ema_decay=0": not t.ema_decay}
  return [what for what, ok in checks.items() if not ok]


def torch_step(config, steps: int):
  """(call(i) running the baseline's training step on batch i of `steps`, torch) with jaxlm's shapes."""
  if not os.path.isfile(_TORCH_REF.value):
    raise app.UsageError(f"--torch_ref={_TORCH_REF.value}: no such file; give the baseline's train.py")
  spec = importlib.util.spec_from_file_location("torch_ref_train", _TORCH_REF.value)
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  m, B, V = config.model, config.training.batch_size, bench_step._VOCAB.value
  args = ref.parse_args(["--device=cpu", f"--batch-size={B}", f"--vocab-size={V}",
                         f"--seq-length={config.data.seq_length}", f"--dim-model={m.d_model}",
                         f"--num-layers={m.num_layers}", f"--num-heads={m.num_heads}", f"--dim-ff={m.d_ff}",
                         f"--dropout={m.dropout}"])
  dev = ref.torch.device("cpu")
  model, fmodel, opt, sched = ref.build(args, V, dev, args.num_steps)
  pool = ref.torch.as_tensor(np.random.default_rng(0).integers(0, V, size=(steps * B, config.data.seq_length)))
  return lambda i: ref.train_step(args, dev, model, fmodel, opt, sched, pool[i * B:(i + 1) * B]), ref.torch


def main(_):
  config = bench_step._CONFIG.value
  steps, B, L = bench_step._STEPS.value, config.training.batch_size, config.data.seq_length
  s = train_lib.setup(config, bench_step._VOCAB.value, num_steps=10_000)
  if unlike := unlike_the_baseline(s):
    raise app.UsageError("the baseline's step needs " + ", ".join(unlike))
  _, jax_call = bench_step.make_variant(s, "step", 1, steps)
  call_torch, torch = torch_step(config, steps)
  state = train_lib.init_state(s)
  for i in range(bench_step._WARMUP.value):  # warm-up of both
    state, _ = jax_call(state, i % steps)
    call_torch(i % steps)
  jax.block_until_ready(state)
  times = {"jaxlm": [], "torch": []}

  def run_jaxlm(state):
    t0 = time.perf_counter()
    for i in range(steps):
      state, _ = jax_call(state, i)
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0

  def run_torch():
    t0 = time.perf_counter()
    for i in range(steps):
      call_torch(i)
    return time.perf_counter() - t0

  for r in range(_ROUNDS.value):
    if r % 2:
      torch_s = run_torch()
      state, jax_s = run_jaxlm(state)
    else:
      state, jax_s = run_jaxlm(state)
      torch_s = run_torch()
    jax_ms, torch_ms = jax_s / steps * 1e3, torch_s / steps * 1e3
    times["jaxlm"].append(jax_ms), times["torch"].append(torch_ms)
    print(json.dumps({"round": r, "batch_size": B, "jaxlm_ms": round(jax_ms, 2), "torch_ms": round(torch_ms, 2),
                      "jaxlm_over_torch": round(torch_ms / jax_ms, 3)}), flush=True)
  print(json.dumps({"batch_size": B, "seq_length": L, "d_model": config.model.d_model, "steps": steps,
                    "rounds": _ROUNDS.value, "jaxlm_median_ms": round(float(np.median(times["jaxlm"])), 2),
                    "torch_median_ms": round(float(np.median(times["torch"])), 2),
                    "jaxlm_tokens_per_s": round(B * L / np.median(times["jaxlm"]) * 1e3, 1),
                    "median_jaxlm_over_torch": round(float(np.median(np.divide(times["torch"], times["jaxlm"]))), 3),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax.__version__}),
        flush=True)


if __name__ == "__main__":
  app.run(main)
