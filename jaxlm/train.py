"""Training: the optimizer, the TrainState, the jitted train/eval steps and the epoch loop.

`train_and_evaluate(config)` is the whole run behind `python -m jaxlm.main`: for each epoch
train over every batch, validate over the whole validation split, log, checkpoint (`last` every
epoch, `best` on improvement) and check early stopping; at the end evaluate `best` on the test split.
Re-running in a work directory with a `last` checkpoint resumes the same run exactly.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. the loss diverged); the message says what to do."""


class Interrupted(Exception):
  """SIGINT or SIGTERM stopped the run after `last` was saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step:,}")
    self.signum = signum


class TrainState(train_state.TrainState):
  dropout_key: jax.Array  # dropout of step s uses fold_in(dropout_key, s): any step can be replayed


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


def create_train_state(config: ml_collections.ConfigDict, model: model_lib.Transformer,
                       tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters and optimizer state from config.training.seed (one compiled program)."""

  @jax.jit
  def init(key):
    init_key, dropout_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, config.data.seq_length), jnp.int32))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, dropout_key=dropout_key)
    return state.replace(step=jnp.zeros((), jnp.int32))  # typed as train_step returns it: one compile

  return init(jax.random.PRNGKey(config.training.seed))


# ---------------------------------------------------------------------------------------------- steps
def next_token_losses(logits_BLV: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """float32 [B, L-1]: cross-entropy of each token given those before it."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1], tokens_BL[:, 1:])


def train_step(state: TrainState, tokens_BL: jax.Array, learning_rate_fn: optax.Schedule):
  """One optimizer update on int32 [B, L] tokens -> (new state, metrics). Pure."""
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, tokens_BL, deterministic=False, rngs={"dropout": dropout_key})
    return next_token_losses(logits, tokens_BL).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),  # before clipping
             "learning_rate": learning_rate_fn(state.step)}  # the rate this update used
  return state.apply_gradients(grads=grads), metrics


def eval_step(params, batch: tuple[jax.Array, jax.Array], apply_fn):
  """(summed loss, token count) of (int32 [B, L] tokens, bool [B] mask of real rows). Summing lets a
  split's per-token mean be exact whatever the batch size."""
  tokens_BL, mask_B = batch
  losses = next_token_losses(apply_fn({"params": params}, tokens_BL, deterministic=True), tokens_BL)
  weights = jnp.broadcast_to(mask_B[:, None], losses.shape)
  return jnp.sum(losses * weights), jnp.sum(weights, dtype=jnp.int32)


def evaluate(eval_fn, params, seqs: np.ndarray, batch_size: int, num_bytes: int) -> dict:
  """Per-token loss, perplexity and bits per byte over every sequence of a split."""
  sums = [eval_fn(params, batch) for batch in data_lib.eval_batches(seqs, batch_size)]
  sums = jax.device_get(sums)  # one wait for the whole split
  nats = math.fsum(float(s) for s, _ in sums)
  count = sum(int(c) for _, c in sums)
  loss = nats / count
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bpb": metrics_lib.bits_per_byte(nats, num_bytes)}


# ----------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class LoopState:
  """What the epoch loop carries besides the TrainState; saved as checkpoint metadata."""
  epoch: int = 0  # epochs completed
  best_val_loss: float | None = None
  best_epoch: int | None = None
  bad_epochs: int = 0  # consecutive epochs without a better validation loss
  train_loss_sum: float = 0.0  # of the epoch in progress: non-zero only in a mid-epoch checkpoint
  train_steps: int = 0

  def improve(self, val_loss: float) -> bool:
    """Records an epoch's validation loss; True when it is the best so far."""
    if self.best_val_loss is None or val_loss < self.best_val_loss:
      self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
      return True
    self.bad_epochs += 1
    return False


# Settings a resumed run must share with its checkpoint: they shape the state or the data order.
_MUST_MATCH = ("data.seq_length", "model.d_model", "model.num_layers", "model.num_heads", "model.d_ff",
               "model.max_seq_length", "model.tie_embeddings", "model.param_dtype", "training.batch_size",
               "training.seed", "training.decay_all_params")


def _check_resumable(config, meta: dict, data_name: str, num_steps: int, where: str) -> None:
  old, new = config_lib.flatten(meta["config"]), config_lib.flatten(config)
  clash = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in _MUST_MATCH if old.get(k) != new[k]]
  if meta["data"] != data_name:
    clash.append(f"data (tokenized corpus) {meta['data']} -> {data_name}")
  if clash:
    raise checkpoint_lib.CheckpointError(
        f"the checkpoint in {where} belongs to a run with other settings ({'; '.join(clash)}). Resume "
        f"with the same settings, or start over with --fresh (the old run is kept aside) or another "
        f"--config.workdir.")
  changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v and k != "workdir"]
  if changed:
    print(f"resuming with changed settings: {'; '.join(changed)}", flush=True)
  if meta["num_steps"] != num_steps:
    print(f"WARNING: the learning-rate schedule now spans {num_steps:,} steps instead of "
          f"{meta['num_steps']:,}: the rate jumps to the new curve at step {int(meta['global_step']):,}. "
          f"Keep it with --config.training.num_steps={meta['num_steps']}.", flush=True)


def _resume(checkpoints, state: TrainState, config, data_name: str, num_steps: int, workdir: str):
  """(state, LoopState) from `last` when there is one, else the fresh ones."""
  if checkpoints.step("last") is None:
    return state, LoopState()
  meta = checkpoints.restore_meta("last")
  _check_resumable(config, meta, data_name, num_steps, workdir)
  state, meta = checkpoints.restore("last", state)
  loop = LoopState(**{f.name: meta[f.name] for f in dataclasses.fields(LoopState)})
  print(f"resuming from {checkpoints.directory}/last: {loop.epoch} epoch(s) done, step "
        f"{int(state.step):,}, best val loss {loop.best_val_loss}", flush=True)
  return state, loop


def _move_aside(workdir: str) -> None:
  if os.path.isdir(workdir) and os.listdir(workdir):
    aside = f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(workdir, aside)
    print(f"fresh start: the previous run in {workdir} is now in {aside}", flush=True)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


class _StopRequest:
  """Turns the first SIGINT/SIGTERM into a request to stop after the current step (the loop then
  saves `last`); a second SIGINT interrupts at once."""

  def __init__(self):
    self.signum = None

  def __enter__(self):
    self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in self._previous:
      signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
          f"(Ctrl-C again to quit at once)", flush=True)

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _split_sequences(config, corpus: data_lib.Corpus) -> dict[str, np.ndarray]:
  L, B = config.data.seq_length, config.training.batch_size
  seqs = {s: data_lib.sequences(corpus.tokens[s], L) for s in data_lib.SPLITS}
  for split, need in (("train", B), ("validation", 1), ("test", 1)):
    if len(seqs[split]) < need:
      raise data_lib.DataError(f"the {split} split has {len(corpus.tokens[split]):,} tokens: fewer than "
                               f"{need} sequence(s) of data.seq_length = {L}. Use more data or a shorter "
                               f"--config.data.seq_length.")
  return seqs


def train_and_evaluate(config: ml_collections.ConfigDict, fresh: bool = False) -> dict:
  """Trains, validates, checkpoints and tests as `config` says, in config.workdir; returns the run's
  summary. `fresh` moves an earlier run in that directory aside instead of resuming it."""
  config_lib.validate(config)
  workdir = config.workdir
  device = config_lib.select_device(config)
  dtype = config_lib.compute_dtype(config, device)
  corpus = data_lib.load(config, verbose=True)
  data_name = os.path.basename(corpus.path)
  t, L, B = config.training, config.data.seq_length, config.training.batch_size
  seqs = _split_sequences(config, corpus)
  # UTF-8 bytes of the tokens each split's loss predicts (all but the first of each sequence).
  split_bytes = {s: int(corpus.token_bytes[seqs[s][:, 1:]].sum()) for s in ("validation", "test")}
  steps_per_epoch = data_lib.steps_per_epoch(len(seqs["train"]), B)
  total_steps = t.epochs * steps_per_epoch
  num_steps = schedule_length(config, total_steps)
  schedule = make_schedule(config, num_steps)
  model = model_lib.build(config, corpus.vocab_size, dtype)
  with jax.default_device(device):
    state = create_train_state(config, model, make_optimizer(config, schedule))
  num_params = model_lib.count_params(state.params)
  flops_per_token = model_lib.flops_per_token(config, corpus.vocab_size)
  peak = metrics_lib.peak_flops(device, dtype)
  print(f"devices: {jax.devices()}; training on {device.device_kind} ({device.platform}), "
        f"compute dtype {jnp.dtype(dtype).name}", flush=True)
  print(f"config:\n{config}", flush=True)
  print(f"model: {num_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOP per token (train)")
  print(f"data: {len(seqs['train']):,} train sequences of {L} tokens -> {steps_per_epoch:,} steps per "
        f"epoch of batch {B}; {total_steps:,} steps in {t.epochs} epochs; schedule {num_steps:,} steps "
        f"(warmup {t.warmup_steps:,})", flush=True)

  if fresh:
    _move_aside(workdir)
  os.makedirs(workdir, exist_ok=True)
  train_fn = jax.jit(functools.partial(train_step, learning_rate_fn=schedule), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, apply_fn=model.apply))

  with contextlib.ExitStack() as stack:
    checkpoints = checkpoint_lib.Checkpoints(workdir)
    stack.callback(checkpoints.close)  # waits for a save in flight
    state, loop = _resume(checkpoints, state, config, data_name, num_steps, workdir)
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    step = int(state.step)
    jsonl = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), keep_epochs_up_to=loop.epoch)
    tb = metrics_lib.TensorBoard(os.path.join(workdir, "tensorboard"), resume_step=step)
    stack.callback(tb.close)
    progress = metrics_lib.Progress(total_steps, B * L, flops_per_token, peak)
    stop = stack.enter_context(_StopRequest())
    stack.enter_context(jax.default_device(device))

    def save(name: str, wait: bool = False, **extra) -> None:
      meta = {**dataclasses.asdict(loop), "global_step": step, "num_steps": num_steps,
              "config": config.to_dict(), "data": data_name, **extra}
      # Only `best` can meet its own step again: a run that died between saving `best` and `last`
      # redoes the epoch and reaches the same state, already saved.
      if not checkpoints.save(name, state, meta, wait=wait) and name == "last":
        raise checkpoint_lib.CheckpointError(f"`last` already holds step {step} in {checkpoints.directory}")

    compiled = False  # the first step in this process compiles: kept out of the throughput figures
    if loop.bad_epochs >= t.patience or loop.epoch >= t.epochs:
      print(f"the run in {workdir} is already complete ({loop.epoch} epochs)", flush=True)
    while loop.bad_epochs < t.patience and loop.epoch < t.epochs:
      epoch = loop.epoch + 1
      t_epoch, compile_s, steps_run, pending = time.perf_counter(), 0.0, 0, []
      start = step - loop.epoch * steps_per_epoch  # > 0 when resuming mid-epoch
      for tokens in data_lib.train_batches(seqs["train"], B, t.seed, epoch, start):
        state, step_metrics = train_fn(state, tokens)
        pending.append(step_metrics)
        step, steps_run = step + 1, steps_run + 1
        signum = stop.signum  # read once: a signal may land at any moment
        end_of_epoch = step == epoch * steps_per_epoch
        if not compiled:
          jax.block_until_ready(state)
          compile_s, compiled = time.perf_counter() - t_epoch, True
          print(f"compiled and ran the first train step in {compile_s:.1f}s", flush=True)
          progress.reset(step)
        if step % t.log_every_steps == 0 or end_of_epoch or signum:
          # Read the metrics of the last steps at once: the device runs ahead in between.
          host = jax.device_get(pending)
          pending = []
          losses = [float(m["loss"]) for m in host]
          if not all(map(math.isfinite, losses)):
            raise TrainingError(
                f"the training loss became {losses[-1]} by step {step:,} (epoch {epoch}, learning rate "
                f"{float(host[-1]['learning_rate']):.2e}). Nothing was saved from this epoch; the "
                f"checkpoints in {workdir} are intact. Lower --config.training.learning_rate (now "
                f"{t.learning_rate}) or check the data, then re-run to resume from `last`, or add "
                f"--fresh to start over.")
          loop.train_loss_sum += math.fsum(losses)
          loop.train_steps += len(losses)
          means = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "grad_norm")}
          means["learning_rate"] = float(host[-1]["learning_rate"])
          if not signum:  # a stop's partial interval: the resumed run logs it at the interval's end
            tb.scalars(step, {**means, **progress.rates(step)}, "train")
          if step % t.log_every_steps == 0:
            print(progress.line(epoch, t.epochs, step, means["loss"], means["learning_rate"],
                                epoch * steps_per_epoch - step), flush=True)
        if signum and not end_of_epoch:  # at an epoch's end, validate and save as usual first
          save("last")
          raise Interrupted(signum, step)
      train_s = time.perf_counter() - t_epoch - compile_s

      val = evaluate(eval_fn, state.params, seqs["validation"], t.eval_batch_size, split_bytes["validation"])
      if not math.isfinite(val["loss"]):
        raise TrainingError(f"the validation loss is {val['loss']} after epoch {epoch}: training diverged. "
                            f"Lower --config.training.learning_rate and re-run with --fresh.")
      train_loss = loop.train_loss_sum / loop.train_steps
      loop.epoch, loop.train_loss_sum, loop.train_steps = epoch, 0.0, 0
      improved = loop.improve(val["loss"])
      tokens_per_s = steps_run * B * L / train_s if steps_run else None
      record = {"epoch": epoch, "global_step": step, "train_loss": train_loss, "val_loss": val["loss"],
                "val_perplexity": val["perplexity"], "val_bpb": val["bpb"],
                "learning_rate": float(schedule(step - 1)),  # of the epoch's last update
                "epoch_time_s": time.perf_counter() - t_epoch, "tokens_per_s": tokens_per_s,
                "mfu": metrics_lib.mfu(tokens_per_s, flops_per_token, peak),
                "best_val_loss": loop.best_val_loss, "improved": improved}
      jsonl.write(record)
      tb.scalars(step, {k: val[k] for k in ("loss", "perplexity", "bpb")}, "val")
      # `best` first, complete before `last` starts: if the process dies between the two, `last` is
      # still the previous epoch's, and the resumed run redoes this epoch and finds `best` saved.
      if improved:
        save("best", wait=True, val_loss=val["loss"])
      save("last", val_loss=val["loss"])
      verdict = (" | best, saved" if improved else
                 f" | no improvement ({loop.bad_epochs}/{t.patience} epochs of patience)")
      print(f"epoch {epoch}/{t.epochs} | step {step:,} | train loss {train_loss:.4f} | val loss "
            f"{val['loss']:.4f} | val ppl {val['perplexity']:.2f} | val bpb {val['bpb']:.4f} | "
            f"{tokens_per_s or 0:,.0f} tok/s | {record['epoch_time_s']:.0f}s{verdict}", flush=True)
      if loop.bad_epochs >= t.patience:
        print(f"early stopping: no better validation loss for {t.patience} epochs", flush=True)
      if stop.signum:  # arrived during evaluation or saving: `last` is already this epoch's
        raise Interrupted(stop.signum, step)
      progress.reset(step)

    # Test the best model.
    best_state, _ = checkpoints.restore("best", state)
    test = evaluate(eval_fn, best_state.params, seqs["test"], t.eval_batch_size, split_bytes["test"])
    tb.scalars(step, {k: test[k] for k in ("loss", "perplexity", "bpb")}, "test")
  summary = {"epochs": loop.epoch, "global_step": step, "stopped_early": loop.bad_epochs >= t.patience,
             "best_epoch": loop.best_epoch, "best_val_loss": loop.best_val_loss, "num_params": num_params,
             **{f"test_{k}": v for k, v in test.items()}}
  _write_json(os.path.join(workdir, "test_metrics.json"), summary)
  print(f"test (best epoch {loop.best_epoch}): loss {test['loss']:.4f} | ppl {test['perplexity']:.2f} | "
        f"bpb {test['bpb']:.4f}", flush=True)
  print("summary: " + json.dumps(summary), flush=True)
  return summary
