"""Times text generation: decode tokens/s of jaxlm.generate's KV-cache sampler, and the same greedy
decoding without a cache (every new token runs the model over the whole sequence so far), one JSON
line per measurement. Untrained weights: speed does not depend on them.

  python experiments/bench_generate.py --config=configs/base.py --config.model.max_seq_length=1024 \\
      --prompt_tokens=512 --new_tokens=512 --batch_sizes=1,32 --modes=cached,recompute

Both are one jitted loop with static shapes (the sampler's chunked `fori_loop`s under a
`while_loop`; a `fori_loop` here); the recomputing one runs the model on a [B, prompt + new] buffer
each step (causal attention makes the padding after the last token irrelevant), as a cache-less
decoder compiled once must.
"""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import generate as generate_lib
from jaxlm import model as model_lib
from jaxlm import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 512, "prompt length")
_NEW = flags.DEFINE_integer("new_tokens", 512, "tokens generated per row")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "32"], "rows decoded together")
_MODES = flags.DEFINE_list("modes", ["cached", "recompute"], "cached (make_sampler), cached_stop (as "
                          "`python -m jaxlm.generate` runs it: asking the host every 16 tokens whether to stop) "
                          "and/or recompute")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "vocabulary")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls after the compiling one; the median is reported")


def recompute_sampler(model, new_tokens: int):
  """Greedy decoding without a cache: the whole sequence through the model for every new token."""

  @jax.jit
  def sample(params, tokens_BP, lengths_B, seed):
    del seed
    B, P = tokens_BP.shape
    tokens_BT = jnp.concatenate([tokens_BP, jnp.zeros((B, new_tokens), jnp.int32)], axis=1)

    def step(i, carry):
      tokens_BT, lengths_B = carry
      logits_BTV = model.apply({"params": params}, tokens_BT)
      last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
      new_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
      return tokens_BT.at[jnp.arange(B), lengths_B].set(new_B), lengths_B + 1

    return jax.lax.fori_loop(0, new_tokens, step, (tokens_BT, lengths_B))

  return sample


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  setup = train_lib.setup(config, _VOCAB.value, num_steps=10_000)  # untrained: speed does not depend on it
  device, dtype, model, params = setup.device, setup.dtype, setup.model, train_lib.init_state(setup).params
  context = model.max_seq_length
  if _PROMPT.value + _NEW.value > context:
    raise SystemExit(f"prompt + new tokens ({_PROMPT.value + _NEW.value}) must fit the context ({context}): "
                     f"raise --config.model.max_seq_length")
  with jax.default_device(device):
    for batch in map(int, _BATCHES.value):
      prompts = np.random.default_rng(0).integers(0, _VOCAB.value, (batch, _PROMPT.value), dtype=np.int32)
      lengths = np.full(batch, _PROMPT.value, np.int32)
      for mode in _MODES.value:
        sampler = (recompute_sampler(model, _NEW.value) if mode == "recompute" else
                   generate_lib.make_sampler(model, _NEW.value, temperature=0.0,
                                             stop=(lambda: False) if mode == "cached_stop" else None))
        t0 = time.perf_counter()
        tokens, _ = jax.block_until_ready(sampler(params, prompts, lengths, 0))
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(_REPEATS.value):
          t0 = time.perf_counter()
          tokens, _ = jax.block_until_ready(sampler(params, prompts, lengths, 0))
          times.append(time.perf_counter() - t0)
        dt = float(np.median(times))
        print(json.dumps(dict(
            impl="jaxlm", mode=mode, device=device.platform, device_name=device.device_kind,
            dtype=jnp.dtype(dtype).name, batch_size=batch, prompt_tokens=_PROMPT.value, new_tokens=_NEW.value,
            context=context, d_model=config.model.d_model, num_layers=config.model.num_layers,
            vocab_size=_VOCAB.value, params=model_lib.count_params(params), seconds=round(dt, 4),
            ms_per_token=round(1000 * dt / _NEW.value, 3), tokens_per_s=round(batch * _NEW.value / dt, 1),
            first_call_s=round(first_s, 2), checksum=int(np.asarray(tokens)[:, -_NEW.value:].sum()),
            xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, host=platform.node())), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
