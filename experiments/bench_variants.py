"""Variants of the training step, each compiled once in one process and timed in alternating rounds,
so that the machine's drift cancels (variant A against B measured minutes apart on a shared VM can
differ by more than the change). Takes bench_step.py's flags (--config, --config.*, --modes with one
mode, --steps_per_call with one value for --modes=calls, --steps, --warmup, --vocab_size); one JSON
line per variant.

Variants (--variants, any of):
  now                     the model as it is
  threefry_dropout        flax's nn.Dropout (jax.random.bernoulli, threefry's bits), jaxlm's masks
                          before 2026-11-30, instead of model.Dropout's hashed ones
  no_dropout              every dropout rate 0 (residual, attention, token)
  dense_input_transposed  on a CPU (elsewhere Dense is lax's already), every Dense keeps a transposed
                          copy of its input for the weight gradient (model.cpu_dot_general before 2026-12-01)
  dense_lax               on a CPU, Dense with lax.dot_general (XLA's own weight gradient)
  gelu_erfc               GELU as jax.nn.gelu computes it, in the input's dtype (the exact form through
                          erfc), jaxlm's before 2026-12-01
  xla_attention           model.attention=xla: jax.nn.dot_product_attention's XLA implementation (a
                          CPU's auto before 2026-12-01)
  blocked_attention       model.attention=blocked: model.causal_attention_by_blocks
  embedding_grad_bf16     the token embedding's lookup gradient scatter-added into one table per batch
                          shard ([shards, V, D], sharded like the batch), cast to bfloat16 and summed, so
                          that several devices all-reduce it in bfloat16, not float32
                          (experiments/embedding_grad_hlo.py; issue 10's 2-GPU data-parallel step)
and combinations of them joined by "+" (dense_input_transposed+gelu_erfc: jaxlm on 2026-11-30).

  python experiments/bench_variants.py --config=configs/base.py --steps=20 --rounds=14 \
      --variants=threefry_dropout,now,no_dropout
"""
import json
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import bench_step
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib
from jaxlm import train as train_lib


class ThreefryDropout(nn.Module):
  """model.Dropout's interface over flax's nn.Dropout."""
  rate: float
  broadcast_dims: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, deterministic):
    return nn.Dropout(self.rate, broadcast_dims=self.broadcast_dims)(x, deterministic=deterministic)


def lookup_with_grad(backward):
  """jnp.take(table_VD, tokens_BL, axis=0) whose table gradient is backward(tokens_BL, g_BLD, (V, D))."""

  @jax.custom_vjp
  def lookup(table_VD, tokens_BL):
    return jnp.take(table_VD, tokens_BL, axis=0)

  lookup.defvjp(lambda table, tokens: (lookup(table, tokens), (tokens, table.shape)),
                lambda residuals, g_BLD: (backward(residuals[0], g_BLD, residuals[1]), None))
  return lookup


def per_shard_bf16_grad(tokens_BL, g_BLD, shape):
  """A lookup's table gradient scatter-added into one [V, D] table per batch shard ([shards, V, D],
  sharded like the batch, which is split over every device), cast to bfloat16 and summed: several
  devices all-reduce it in bfloat16, after the cast."""
  V, D = shape
  shards = jax.device_count()
  batch = NamedSharding(jax.make_mesh((shards, 1), sharding_lib.BATCH, (AxisType.Auto, AxisType.Auto)),
                        PartitionSpec(sharding_lib.BATCH))  # the run's mesh, on its devices
  tokens_SN, g_SND = tokens_BL.reshape(shards, -1), g_BLD.reshape(shards, -1, D).astype(jnp.float32)
  parts_SVD = jax.vmap(lambda t, g: jnp.zeros((V, D), jnp.float32).at[t].add(g))(tokens_SN, g_SND)
  parts_SVD = jax.lax.with_sharding_constraint(parts_SVD.astype(jnp.bfloat16), batch)
  # lax.reduce, not jnp.sum: jnp.sum adds bfloat16 in float32, and the all-reduce with it
  return jax.lax.reduce(parts_SVD, jnp.bfloat16(0), jax.lax.add, (0,)).astype(jnp.float32)


def _per_shard_bf16_jnp():
  """jax.numpy for the model, with a take whose gradient for the [vocab, d] token table (the
  position table is left alone) is per_shard_bf16_grad."""
  lookup = lookup_with_grad(per_shard_bf16_grad)
  take = lambda a, indices, axis=None, **kw: (  # noqa: E731
      lookup(a, indices) if axis == 0 and a.shape[0] == bench_step._VOCAB.value else jnp.take(a, indices, axis, **kw))
  return types.SimpleNamespace(**{**vars(jnp), "take": take})


# name -> what it changes: model_lib attributes replaced while its model is built and traced, and
# config keys (those with a ".") set
VARIANTS = {
    "now": {},
    "threefry_dropout": {"Dropout": ThreefryDropout},
    "no_dropout": {"model.dropout": 0.0, "model.attention_dropout": 0.0, "model.token_dropout": 0.0},
    "xla_attention": {"model.attention": "xla"},
    "blocked_attention": {"model.attention": "blocked"},
    "dense_input_transposed": {
        "cpu_dot_general": lambda x, w, *_, **__: model_lib._matmul_saving_transposed_input(x, w)},
    "dense_lax": {"cpu_dot_general": jax.lax.dot_general},
    "gelu_erfc": {"gelu": lambda x, approximate: nn.gelu(x, approximate=approximate)},
    "embedding_grad_bf16": {"jnp": _per_shard_bf16_jnp()},
}
_ROUNDS = flags.DEFINE_integer("rounds", 6, "alternating timed rounds of --steps steps per variant")
_VARIANTS = flags.DEFINE_list("variants", ["now"], ", ".join(VARIANTS))


def _valid(variants: list) -> bool:
  """Known names, each variant once, and no combination setting one thing twice."""
  def consistent(parts):
    if not set(parts) <= set(VARIANTS):
      return False
    keys = [k for p in parts for k in VARIANTS[p]]
    keys += ["Dropout" for p in parts if p == "no_dropout"]  # flax's or hashed masks of nothing
    return len(keys) == len(set(keys))
  return bool(variants) and len(set(variants)) == len(variants) and all(consistent(v.split("+")) for v in variants)


flags.register_validator("variants", _valid, f"--variants takes distinct ones of {', '.join(VARIANTS)}, or "
                         "several joined by + that do not change the same thing")
flags.register_validator("modes", lambda m: len(m) == 1, "bench_variants.py takes one --modes value")
flags.register_validator("steps_per_call", lambda k: len(k) == 1, "bench_variants.py takes one --steps_per_call")


def compile_variant(config, variant: str, num_calls: int):
  """(compile seconds, call(state, i), state after the warm-up calls) of `variant`'s training program."""
  config = config.copy_and_resolve_references()
  changes = {name: value for part in variant.split("+") for name, value in VARIANTS[part].items()}
  patches = {name: value for name, value in changes.items() if "." not in name}
  for key in changes.keys() - patches.keys():
    section, name = key.split(".")
    config[section][name] = changes[key]
  saved = {name: getattr(model_lib, name) for name in patches}
  for name, value in patches.items():
    setattr(model_lib, name, value)
  try:
    s = train_lib.setup(config, bench_step._VOCAB.value, 1000)
    compile_s, call = bench_step.make_variant(s, bench_step._MODES.value[0], steps_per_call(),
                                              num_calls + bench_step._WARMUP.value)
    state = train_lib.init_state(s)
    for i in range(bench_step._WARMUP.value):
      state, _ = call(state, num_calls + i)
    return compile_s, call, jax.block_until_ready(state)
  finally:
    for name, value in saved.items():
      setattr(model_lib, name, value)


def steps_per_call() -> int:
  return int(bench_step._PER_CALL.value[0]) if bench_step._MODES.value[0] == "calls" else 1


def main(_):
  config, k = bench_step._CONFIG.value, steps_per_call()
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
                      "best_ms": round(min(times), 3), "median_ms": round(float(np.median(times)), 3)}), flush=True)


if __name__ == "__main__":
  app.run(main)
