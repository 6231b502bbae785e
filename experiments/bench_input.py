"""How the way batches reach the device changes step time (base config, batch 2, where the step is
short and input overhead shows). One JSON line per variant:

  device   batches put on the device beforehand (the step alone; bench_step.py's setting)
  host     a numpy batch gathered from the token array and passed to the jitted step (a plain loop)
  prefetch the same, with jax.device_put two batches ahead
  gather   the token array on the device once; the step gathers its batch there from the epoch's
           order and state.step: no transfer per step

  python experiments/bench_input.py --config=configs/base.py --steps=300
"""
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import model as model_lib
from jaxlm import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
_STEPS = flags.DEFINE_integer("steps", 300, "timed steps per variant")
_VOCAB = 8192


def main(argv):
  del argv
  config = _CONFIG.value
  device = config_lib.select_device(config)
  dtype = config_lib.compute_dtype(config, device)
  B, L, n = config.training.batch_size, config.data.seq_length, _STEPS.value
  tokens = np.random.default_rng(0).integers(0, _VOCAB, (n + 10) * B * L).astype(np.uint16)
  seqs = data_lib.sequences(tokens, L)
  order = data_lib.epoch_order(0, 1, len(seqs))
  model = model_lib.build(config, _VOCAB, dtype)
  schedule = train_lib.make_schedule(config, 10_000)
  tx = train_lib.make_optimizer(config, schedule)
  step_fn = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule), donate_argnums=0)

  def host_batches():
    return data_lib.train_batches(seqs, B, 0, 1)

  def gather_step(state, seqs_dev, order_dev):
    i = state.step  # one epoch here: the batch index is the step
    idx = jax.lax.dynamic_slice_in_dim(order_dev, i * B, B)
    return train_lib.train_step(state, seqs_dev[idx], schedule)

  gather_fn = jax.jit(gather_step, donate_argnums=0)

  def run(variant):
    with jax.default_device(device):
      state = train_lib.create_train_state(config, model, tx)
      if variant == "device":
        batches = [jax.device_put(b) for b in host_batches()]
        calls = (lambda s, b=b: step_fn(s, b) for b in batches)
      elif variant == "host":
        calls = (lambda s, b=b: step_fn(s, b) for b in host_batches())
      elif variant == "prefetch":
        def prefetched():
          queue, it = [], host_batches()
          for b in it:
            queue.append(jax.device_put(b))
            if len(queue) == 3:
              yield queue.pop(0)
          yield from queue
        calls = (lambda s, b=b: step_fn(s, b) for b in prefetched())
      else:
        seqs_dev, order_dev = jax.device_put(np.asarray(seqs, np.int32)), jax.device_put(order.astype(np.int32))
        calls = (lambda s: gather_fn(s, seqs_dev, order_dev) for _ in range(n + 10))
      calls = iter(calls)
      for _ in range(10):
        state, m = next(calls)(state)
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(n):
        state, m = next(calls)(state)
      jax.block_until_ready(m)
      dt = time.perf_counter() - t0
    print(json.dumps({"variant": variant, "device_name": device.device_kind, "dtype": jnp.dtype(dtype).name,
                      "batch_size": B, "ms_per_step": round(1000 * dt / n, 3),
                      "tokens_per_s": round(n * B * L / dt, 1), "final_loss": round(float(m["loss"]), 4)}),
          flush=True)

  for variant in ("device", "host", "prefetch", "gather", "device", "host"):
    run(variant)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
