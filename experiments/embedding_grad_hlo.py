"""Where XLA's SPMD partitioner reduces the tied embedding's lookup gradient over a data-parallel
mesh, for three ways of writing the lookup (issue 10: that gradient is the 100.7 MB float32
all-reduce of the 2-GPU GPT-2-small step). On 2 host devices; prints each variant's all-reduces
from the optimized HLO and checks its gradient against jnp.take's.

  python experiments/embedding_grad_hlo.py

Variants:
  take          jnp.take of the float32 table (jaxlm's model): scatter-add, then the all-reduce
  cast_after    a custom_vjp whose backward scatter-adds in float32 and returns the gradient cast to
                bfloat16: the partitioner still all-reduces the float32 scatter, before the cast
  per_shard     a custom_vjp whose backward scatter-adds into one [V, D] table per data shard
                ([shards, V, D], sharded like the batch), casts it to bfloat16 and sums the shards:
                the all-reduce comes after the cast (XLA:CPU then promotes a bfloat16 all-reduce
                to float32, "clone_promoted"; XLA:GPU reduces bfloat16 natively, as it does the
                tied head's gradient)
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from bench_variants import lookup_with_grad, per_shard_bf16_grad  # noqa: E402
from jaxlm import sharding as sharding_lib  # noqa: E402

MESH = jax.make_mesh((2, 1), sharding_lib.BATCH, (AxisType.Auto, AxisType.Auto))  # a run's, data parallel


def cast_after(tokens_BL, g_BLD, shape):
  return jnp.zeros(shape, jnp.float32).at[tokens_BL].add(g_BLD).astype(jnp.bfloat16).astype(jnp.float32)


VARIANTS = {"take": lambda table, tokens: jnp.take(table, tokens, axis=0),
            "cast_after": lookup_with_grad(cast_after), "per_shard": lookup_with_grad(per_shard_bf16_grad)}


def main():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(1024, 64)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 1024, (8, 16)), jnp.int32)
  w = jnp.asarray(rng.normal(size=(8, 16, 64)), jnp.float32)
  replicated, batch = NamedSharding(MESH, P()), NamedSharding(MESH, P(sharding_lib.BATCH))
  want = None
  for name, lookup in VARIANTS.items():
    loss = lambda t, x, w, lookup=lookup: (lookup(t, x) * w).sum()  # noqa: E731
    grad = jax.jit(jax.grad(loss), in_shardings=(replicated, batch, batch), out_shardings=replicated)
    hlo = grad.lower(table, tokens, w).compile().as_text()
    print(f"## {name}")
    for line in hlo.splitlines():
      if "all-reduce(" in line or " scatter(" in line:
        promoted = " (a bfloat16 reduction promoted)" if "promoted" in line else ""
        print("  " + line.strip()[:120] + promoted)
    got = np.asarray(grad(table, tokens, w))
    want = got if want is None else want
    print(f"  max |gradient - take's| = {np.abs(got - want).max():.3g} (of max {np.abs(want).max():.3g})")


if __name__ == "__main__":
  main()
