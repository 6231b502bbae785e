"""Times jaxlm's jitted train step: one JSON line per run, comparable with the PyTorch baseline's
`train.py --bench-steps` (same model, batch, sequence length and vocabulary; random tokens unless
--tokens-npy is given).

  python experiments/bench_step.py --config=configs/base.py --steps=50
  python experiments/bench_step.py --config=configs/base.py --config.training.batch_size=32
  python experiments/bench_step.py --config=configs/base.py --config.model.d_model=512 ... --vocab_size=8192
"""
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
from jaxlm import model as model_lib
from jaxlm import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
_STEPS = flags.DEFINE_integer("steps", 50, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 5, "untimed steps first (compilation included)")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "vocabulary of the random tokens")
_TOKENS = flags.DEFINE_string("tokens_npy", "", "bench on this token array instead of random tokens")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats; the median is reported")


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  device = config_lib.select_device(config)
  dtype = config_lib.compute_dtype(config, device)
  B, L = config.training.batch_size, config.data.seq_length
  n = (_WARMUP.value + _STEPS.value) * B
  if _TOKENS.value:
    tokens = np.load(_TOKENS.value)
    seqs = tokens[: len(tokens) // L * L].reshape(-1, L)
    pool = seqs[np.arange(n) % len(seqs)].astype(np.int32)
  else:
    pool = np.random.default_rng(0).integers(0, _VOCAB.value, (n, L), dtype=np.int32)
  model = model_lib.build(config, _VOCAB.value, dtype)
  schedule = train_lib.make_schedule(config, 10_000)
  with jax.default_device(device):
    state = train_lib.create_train_state(config, model, train_lib.make_optimizer(config, schedule))
    batches = [jax.device_put(pool[i * B:(i + 1) * B]) for i in range(n // B)]
    step_fn = jax.jit(lambda s, b: train_lib.train_step(s, b, schedule), donate_argnums=0)
    t0 = time.perf_counter()
    for b in batches[:_WARMUP.value]:
      state, m = step_fn(state, b)
    jax.block_until_ready(m)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      for b in batches[_WARMUP.value:]:
        state, m = step_fn(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  tokens_per_s = _STEPS.value * B * L / dt
  flops = model_lib.flops_per_token(config, _VOCAB.value)
  peak = metrics_lib.peak_flops(device, dtype)
  if device.platform == "gpu":
    peak_mem = device.memory_stats().get("peak_bytes_in_use", 0) / 2**20
  else:
    peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(
      impl="jaxlm", device=device.platform, device_name=device.device_kind, dtype=jnp.dtype(dtype).name,
      attention=config.model.attention, batch_size=B, seq_length=L, d_model=config.model.d_model,
      num_layers=config.model.num_layers, vocab_size=_VOCAB.value,
      params=model_lib.count_params(state.params), steps=_STEPS.value,
      ms_per_step=round(1000 * dt / _STEPS.value, 3), tokens_per_s=round(tokens_per_s, 1),
      model_tflops=round(tokens_per_s * flops / 1e12, 3),
      mfu=round(metrics_lib.mfu(tokens_per_s, flops, peak), 4) if peak else None,
      spread=round((max(times) - min(times)) / dt, 3), first_steps_s=round(warmup_s, 2),
      final_loss=round(float(m["loss"]), 4), peak_mem_mb=round(peak_mem, 1),
      jax=jax.__version__, host=platform.node())), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
