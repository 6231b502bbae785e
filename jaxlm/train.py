"""The pure core of training: the optimizer, the TrainState, the jitted steps and on-device batching.

`setup(config, vocab_size, num_steps)` is the one place that turns a config into a mesh of devices,
a compute dtype, a model, a schedule, an optimizer and the TrainState's shapes and shardings over the
mesh (`jaxlm.sharding`); the run (`jaxlm.run`), the benchmarks and the tests all start from it.
`init_state` makes a fresh state from them; a resumed run restores one instead.

The train split lives on the device as int [N, L] sequences. `train_steps` runs `num_steps` updates
in one jitted call (a `lax.scan`), each gathering its batch there from the epoch's order (a pure
function of (seed, epoch), see data.epoch_order) and the batch's index in the epoch: there is no
host-to-device copy per step, and any step can be replayed (exact resume). Over several devices the
split is replicated and each device gathers only its own slice of the batch.
"""
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import train_state

from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib


class TrainState(train_state.TrainState):
  dropout_key: jax.Array  # dropout of step s uses fold_in(dropout_key, s): any step can be replayed
  # training.ema_decay > 0: an exponential moving average of `params` over the updates (float32), the
  # weights that are evaluated, saved as `best` and used (model_params); None without one.
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def apply_gradients(self, *, grads, **kwargs) -> "TrainState":
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.ema_params is None:
      return new
    # Bias-corrected (as Adam's moments): after t updates the average weighs update i by
    # decay^(t-i) (1 - decay) / (1 - decay^t), so the first update's weights count fully and no
    # warmup of the decay is needed. Stored corrected: readers take ema_params as they are. In
    # float32 whatever the parameters' dtype: steps of (1 - decay) x a change vanish in bfloat16.
    decay = jnp.float32(self.ema_decay)
    rate = (1 - decay) / (1 - decay ** new.step.astype(jnp.float32))
    return new.replace(ema_params=jax.tree.map(lambda e, p: e + rate * (p.astype(jnp.float32) - e),
                                               self.ema_params, new.params))

  def restart_average(self) -> "TrainState":
    """This state with the moving average (when training.ema_decay > 0) restarted at the parameters:
    a float32 copy in buffers of its own, since the state is donated whole to each update."""
    if not self.ema_decay:
      return self
    return self.replace(ema_params=jax.tree.map(lambda p: jnp.copy(p).astype(jnp.float32), self.params))

  @property
  def model_params(self):
    """The weights to evaluate, sample from and keep: the moving average when there is one."""
    return self.params if self.ema_params is None else self.ema_params


# ------------------------------------------------------------------------------------------ optimizer
def make_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak over warmup_steps, cosine to the floor at num_steps, then the
  floor. Evaluated at the number of updates already made, so the first update uses rate 0."""
  t = config.training
  return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, num_steps,
                                            t.min_learning_rate)


def decay_mask(params):
  """Weight decay on Dense kernels only: not on biases, LayerNorm parameters or embeddings."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  t = config.training
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=None if t.decay_all_params else decay_mask))


def schedule_length(config: ml_collections.ConfigDict, total_steps: int) -> int:
  """training.num_steps, or the run's length when it is -1 (derived from the data)."""
  num_steps = config.training.num_steps
  if num_steps == -1:
    if config.training.warmup_steps >= total_steps:
      raise config_lib.ConfigError(
          f"config key 'training.warmup_steps' = {config.training.warmup_steps} must be below the "
          f"run's {total_steps:,} steps (epochs x steps per epoch)")
    return total_steps
  if num_steps < total_steps:
    print(f"WARNING: training.num_steps = {num_steps:,} is shorter than the run's {total_steps:,} steps: "
          f"the learning rate stays at its floor ({config.training.min_learning_rate}) for the last "
          f"{total_steps - num_steps:,} steps. Use --config.training.num_steps=-1 to fit the schedule "
          f"to the run.", flush=True)
  return num_steps


def _init(config: ml_collections.ConfigDict, model: model_lib.Transformer, tx: optax.GradientTransformation):
  """key -> fresh parameters and optimizer state (the program that makes them)."""

  def init(key):
    init_key, dropout_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, config.data.seq_length), jnp.int32))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, dropout_key=dropout_key,
                              ema_decay=config.training.ema_decay).restart_average()
    return state.replace(step=jnp.zeros((), jnp.int32))  # typed as train_step returns it: one compile

  return init


def abstract_train_state(config: ml_collections.ConfigDict, model: model_lib.Transformer,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """The TrainState as shapes, dtypes and shardings over `mesh` (jax.ShapeDtypeStruct leaves), with
  nothing computed or allocated: what a checkpoint restores into, and what the steps compile for."""
  abstract = jax.eval_shape(_init(config, model, tx), jax.random.PRNGKey(config.training.seed))
  shardings = sharding_lib.state_shardings(mesh, abstract)
  sharding_lib.check_fits(abstract, shardings, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(s: "Setup") -> TrainState:
  """Fresh parameters and optimizer state from training.seed, made in place on the mesh by one
  compiled program. Only a run that starts (not one that resumes) makes them: a resumed run
  restores into `s.abstract_state` and holds one state, not two."""
  init = jax.jit(_init(s.config, s.model, s.optimizer), out_shardings=s.state_shardings)
  return init(jax.random.PRNGKey(s.config.training.seed))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config makes before any data is read: where and how to compute, and what to train."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh  # every device of the run, data x fsdp
  device: jax.Device  # this process's first: the dtype, kernel and peak FLOP/s are chosen for its kind
  dtype: jnp.dtype  # of the matmuls (parameters, optimizer, softmax and loss stay float32)
  model: model_lib.Transformer
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  abstract_state: TrainState  # of jax.ShapeDtypeStructs: shapes, dtypes, shardings over `mesh`
  loss_chunk: int  # tokens per chunk of the training loss's output projection; 0 = all at once
  gpu_matmuls: str  # "xla" or "cublas" (config.gpu_matmuls): XLA's options for compiling the step
  flops_per_token: float  # training FLOPs (forward + backward), for tokens/s -> MFU
  flops_per_device_step: float  # a step's training FLOPs on each device of the mesh
  peak_flops: float | None  # of the whole mesh in `dtype`, when known

  @property
  def state_shardings(self) -> TrainState:  # of NamedShardings
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  @property
  def num_params(self) -> int:
    return model_lib.count_params(self.abstract_state.params)

  @property
  def compiler_options(self) -> dict:
    return config_lib.compiler_options(self.gpu_matmuls)


def setup(config: ml_collections.ConfigDict, vocab_size: int, num_steps: int) -> Setup:
  """The mesh, dtype, model, `num_steps`-long schedule, optimizer and state shapes `config` asks for
  (`init_state` makes a fresh state)."""
  devices = config_lib.select_devices(config)
  device = config_lib.select_device(config)
  mesh = sharding_lib.make_mesh(config, devices)
  dtype = config_lib.compute_dtype(config, device)
  model = model_lib.build(config, vocab_size, dtype, config_lib.attention_kernel(config, device, dtype),
                          device.platform)
  schedule = make_schedule(config, num_steps)
  optimizer = make_optimizer(config, schedule)
  abstract_state = abstract_train_state(config, model, optimizer, mesh)
  peak = metrics_lib.peak_flops(device, dtype)
  flops_per_token = model_lib.flops_per_token(config, vocab_size)
  flops_per_device_step = flops_per_token * config.training.batch_size * config.data.seq_length / mesh.size
  return Setup(config, mesh, device, dtype, model, schedule, optimizer, abstract_state,
               config_lib.loss_chunk(config, device), config_lib.gpu_matmuls(config, device, flops_per_device_step),
               flops_per_token, flops_per_device_step, peak and peak * mesh.size)


# ---------------------------------------------------------------------------------------------- steps
def train_step(state: TrainState, tokens_BL: jax.Array, learning_rate_fn: optax.Schedule, loss_chunk: int = 0):
  """One optimizer update on int32 [B, L] tokens -> (new state, metrics). Pure. loss_chunk: tokens
  per chunk of the loss's output projection (model.chunked_next_token_loss); 0 = all at once."""
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    apply = functools.partial(state.apply_fn, {"params": params}, tokens_BL, deterministic=False,
                              rngs={"dropout": dropout_key})
    if loss_chunk:
      return model_lib.chunked_next_token_loss(*apply(project=False), tokens_BL, loss_chunk)
    return model_lib.next_token_losses(apply(), tokens_BL).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),  # before clipping
             "learning_rate": learning_rate_fn(state.step)}  # the rate this update used
  return state.apply_gradients(grads=grads), metrics


def batch_at(seqs_NL: jax.Array, order_N: jax.Array, index: jax.Array, batch_size: int) -> jax.Array:
  """int32 [batch_size, L]: batch `index` of an epoch, the sequences order_N[index * B : (index + 1) * B]."""
  rows_B = jax.lax.dynamic_slice_in_dim(order_N, index * batch_size, batch_size)
  return jnp.take(seqs_NL, rows_B, axis=0).astype(jnp.int32)


def train_steps(state: TrainState, seqs_NL: jax.Array, order_N: jax.Array, first: jax.Array, *,
                learning_rate_fn: optax.Schedule, batch_size: int, num_steps: int, loss_chunk: int = 0,
                batch_sharding: jax.sharding.Sharding | None = None):
  """`num_steps` updates on the epoch's batches first, first + 1, ... -> (state, metrics of each
  step, stacked: [num_steps]). The same updates as `train_step` on those batches one by one. Each
  batch is laid out as `batch_sharding` says (each device gathers its own rows)."""

  def body(state, i):
    tokens_BL = batch_at(seqs_NL, order_N, first + i, batch_size)
    if batch_sharding is not None:
      tokens_BL = jax.lax.with_sharding_constraint(tokens_BL, batch_sharding)
    return train_step(state, tokens_BL, learning_rate_fn, loss_chunk)

  # Two steps per loop iteration: on an H200 the GPU config's step takes 3.25-3.34 ms against 3.55-3.58
  # with one (3.30 as a bare step), for 10-16 s more compile; level on a CPU (experiments/README.md,
  # "The position embedding as a lookup, and two steps per loop iteration").
  return jax.lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32), unroll=2)


def donate_state(device: jax.Device) -> tuple[int, ...]:
  """donate_argnums of a jitted update of the state (argument 0) on `device`'s platform."""
  return () if device.platform == "cpu" else (0,)


def compile_train_steps(s: Setup, state: TrainState, seqs_NL: jax.Array, order_N: jax.Array,
                        num_steps: int) -> tuple[Callable, float]:
  """(`train_steps` of `num_steps` updates compiled for these arguments, the seconds it took): the
  state keeps its shardings, the train split and the order are replicated, the metrics too. The
  compiled function donates the state on an accelerator: its buffers are reused for the new one. On
  a CPU it does not, where memory is plentiful and donating made the base config's batch-2 step
  5-15% slower (69-70 against 74 ms at best, in alternated rounds; experiments/README.md)."""
  replicated = sharding_lib.replicated(s.mesh)
  fn = jax.jit(functools.partial(train_steps, learning_rate_fn=s.schedule, batch_size=s.config.training.batch_size,
                                 num_steps=num_steps, loss_chunk=s.loss_chunk,
                                 batch_sharding=sharding_lib.batch(s.mesh)),
               in_shardings=(s.state_shardings, replicated, replicated, replicated),
               out_shardings=(s.state_shardings, replicated), donate_argnums=donate_state(s.device))
  t0 = time.perf_counter()
  compiled = fn.lower(state, seqs_NL, order_N, jnp.zeros((), jnp.int32)).compile(s.compiler_options)
  return compiled, time.perf_counter() - t0
