"""Dropout's cost in the training step: flax's nn.Dropout (jax.random.bernoulli, threefry's bits)
against jaxlm's model.Dropout (hashed masks, `model.dropout_keep`) and against no dropout, each
compiled once in one process and timed in alternating rounds, so that the machine's drift cancels.
Takes bench_step.py's flags (--config, --config.*, --modes with one mode, --steps_per_call with one
value, --steps, --warmup, --vocab_size); one JSON line per variant.

  python experiments/bench_dropout.py --config=configs/base.py --steps=20 --rounds=14
"""
import json
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

import bench_step
from jaxlm import model as model_lib
from jaxlm import train as train_lib

_ROUNDS = flags.DEFINE_integer("rounds", 6, "alternating timed rounds of --steps steps per variant")
VARIANTS = ("threefry", "hashed", "none")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "threefry, hashed and/or none")
flags.register_validator("variants", lambda v: bool(v) and set(v) <= set(VARIANTS),
                         f"--variants takes one or more of {', '.join(VARIANTS)}")


class ThreefryDropout(nn.Module):
  """model.Dropout's interface over flax's nn.Dropout: the masks of jaxlm before 2026-11-30."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    return nn.Dropout(self.rate)(x, deterministic=deterministic)


def compile_variant(config, variant: str, num_calls: int):
  """(compile seconds, call(state, i), state after the warm-up calls) of `variant`'s training program."""
  config = config.copy_and_resolve_references()
  if variant == "none":
    config.model.dropout = config.model.attention_dropout = 0.0
  hashed = model_lib.Dropout
  model_lib.Dropout = ThreefryDropout if variant == "threefry" else hashed  # read when the model is traced
  try:
    s = train_lib.setup(config, bench_step._VOCAB.value, 1000)
    compile_s, call = bench_step.make_variant(s, bench_step._MODES.value[0], int(bench_step._PER_CALL.value[0]),
                                              num_calls + bench_step._WARMUP.value)
    state = s.state
    for i in range(bench_step._WARMUP.value):
      state, _ = call(state, num_calls + i)
    return compile_s, call, jax.block_until_ready(state)
  finally:
    model_lib.Dropout = hashed


def main(_):
  config, k = bench_step._CONFIG.value, int(bench_step._PER_CALL.value[0])
  num_calls = max(1, bench_step._STEPS.value // k)
  runs = {v: [*compile_variant(config, v, num_calls), []] for v in _VARIANTS.value}
  for _ in range(_ROUNDS.value):
    for run in runs.values():
      _, call, state, times = run
      t0 = time.perf_counter()
      for i in range(num_calls):
        state, _ = call(state, i)
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / (num_calls * k) * 1e3)
      run[2] = state
  for variant, (compile_s, _, _, times) in runs.items():
    print(json.dumps({"variant": variant, "device": jax.devices()[0].device_kind, "mode": bench_step._MODES.value[0],
                      "steps_per_call": k, "batch_size": config.training.batch_size,
                      "seq_length": config.data.seq_length, "d_model": config.model.d_model,
                      "compile_s": round(compile_s, 1), "ms_per_step": [round(t, 3) for t in times],
                      "best_ms": round(min(times), 3), "median_ms": round(float(np.median(times)), 3)}))


if __name__ == "__main__":
  app.run(main)
