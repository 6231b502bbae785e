"""A training run: the epoch loop and its policy, over the pure core in `jaxlm.train`.

`train_and_evaluate(config)` is the whole run behind `python -m jaxlm.main`: for each epoch
train over every batch (saving `last` every `training.checkpoint_every_*` on the way), validate over
the whole validation split, sample from a fixed prompt, log, checkpoint (`last` every epoch, `best`
on improvement) and check early stopping; at the end evaluate `best` on the test split.
Re-running in a work directory with a `last` checkpoint resumes the same run exactly.

A run spans every device of every process (`jaxlm.sharding`). Every process runs this same loop on
the same replicated metrics, so they take the same decisions; process 0 alone writes files (metrics,
TensorBoard, config, tokenizer), while all save and restore the checkpoints together (orbax). A
signal or a time-based save, which one process may see before another, is agreed on at the next
log boundary.
"""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import generate as generate_lib
from jaxlm import metrics as metrics_lib
from jaxlm import sharding as sharding_lib
from jaxlm import train as train_lib
from jaxlm import workdir as workdir_lib
from jaxlm.cli import UserError, interrupt_after, resend_later, signal_of


class TrainingError(UserError):
  """The run cannot go on (e.g. the loss diverged); the message says what to do."""


class Interrupted(Exception):
  """SIGINT or SIGTERM stopped the run; `last` holds where it stood (its save has completed)."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step:,}")
    self.signum = signum


@dataclasses.dataclass
class LoopState:
  """What the epoch loop carries besides the TrainState; saved as checkpoint metadata."""
  epoch: int = 0  # epochs completed
  best_val_loss: float | None = None
  best_epoch: int | None = None
  bad_epochs: int = 0  # consecutive epochs without a better validation loss
  train_loss_sum: float = 0.0  # of the epoch in progress: non-zero only in a mid-epoch checkpoint
  train_steps: int = 0
  # [loss, gradient norm] of each step of the logging interval in progress (a mid-interval checkpoint's
  # too, so that the resumed run logs the same means)
  interval: list = dataclasses.field(default_factory=list)

  def improve(self, val_loss: float) -> bool:
    """Records an epoch's validation loss; True when it is the best so far."""
    if self.best_val_loss is None or val_loss < self.best_val_loss:
      self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
      return True
    self.bad_epochs += 1
    return False


# Settings a resumed run must share with its checkpoint: they shape the state or the data order.
_MUST_MATCH = ("data.seq_length", "model.d_model", "model.num_layers", "model.num_heads", "model.d_ff",
               "model.max_seq_length", "model.positions", "model.tie_embeddings", "model.param_dtype",
               "model.scan_layers", "data.shift_windows", "training.batch_size", "training.seed",
               "training.decay_all_params")


def _resumable_meta(workdir: str) -> dict | None:
  """The meta of the checkpoint a run in `workdir` would resume from, or None; read without writing
  anything, so that a run refused before its setup leaves the directory as it was."""
  with checkpoint_lib.Checkpoints(workdir, writer=False) as checkpoints:
    name = checkpoints.resumable()
    return checkpoints.restore_meta(name) if name else None


def _check_resumable(config, meta: dict, data_name: str, where: str, in_sweep: bool) -> None:
  """CheckpointError unless `config` (on the corpus cached as `data_name`) can resume `meta`'s run."""
  old, new = config_lib.flatten(config_lib.upgrade(meta["config"])), config_lib.flatten(config)
  clash = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in _MUST_MATCH if old.get(k) != new[k]]
  if bool(old["training.ema_decay"]) != bool(new["training.ema_decay"]):  # the decay itself may change
    clash.append(f"training.ema_decay {old['training.ema_decay']!r} -> {new['training.ema_decay']!r} (a moving "
                 f"average of the weights is kept or not)")
  if data_lib.fingerprint(meta["data"]) != data_lib.fingerprint(data_name):
    clash.append(f"data (tokenized corpus) {meta['data']} -> {data_name}: other text or tokenizer")
  if clash:
    start_over = ("give the sweep another --workdir" if in_sweep else
                  "start over with --fresh (the old run is kept aside) or another --config.workdir")
    raise checkpoint_lib.CheckpointError(
        f"the checkpoint in {where} belongs to a run with other settings ({'; '.join(clash)}). Resume "
        f"with the same settings, or {start_over}.")


def _report_changes(config, meta: dict, num_steps: int, in_sweep: bool) -> None:
  """Prints the settings a resumed run changes, and warns when its schedule's length changes (how
  to keep it, except in a sweep: its points keep their settings)."""
  old = config_lib.flatten(config_lib.upgrade(meta["config"]))
  changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in config_lib.flatten(config).items()
             if old.get(k) != v and k not in config_lib.LOCATION_KEYS]
  if changed:
    print(f"resuming with changed settings: {'; '.join(changed)}", flush=True)
  if meta["num_steps"] != num_steps:
    print(f"WARNING: the learning-rate schedule now spans {num_steps:,} steps instead of "
          f"{meta['num_steps']:,}: the rate jumps to the new curve at step {int(meta['global_step']):,}."
          + ("" if in_sweep else f" Keep it with --config.training.num_steps={meta['num_steps']}."), flush=True)


def _move_aside(workdir: str) -> None:
  """--fresh: the earlier run's directory is renamed, never deleted (under its lock: not in use)."""
  if os.path.isdir(workdir) and os.listdir(workdir):
    aside = f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    with workdir_lib.Lock(workdir):
      os.rename(workdir, aside)
    print(f"fresh start: the previous run in {workdir} is now in {aside}", flush=True)


class _StopRequest:
  """A run's signals, by phase. While it sets up (reads and tokenizes the data, makes or restores the
  state), a SIGINT or SIGTERM stops it at once, as by default (but as an exception, which tells the
  other processes of a multi-process run, `sharding_lib.leave_run`). Once it trains (`training`), the first
  SIGINT/SIGTERM is a request to stop after the current step (the run then saves `last`); a second
  one quits at once, except that a checkpoint being written is finished first (`saving`), so that no
  save is lost half-way. While the trained run is tested (`testing`), the first one stops the test
  at its next batch. Once it is done (`closing`: tested, its last saves being waited for), a signal
  stops it at once again."""

  def __init__(self):
    self.signum = None
    self._phase = "setup"
    self._saving = False
    self._quit = None  # a second signal that came during a save

  def __enter__(self):
    # A signal this process was started with ignored stays ignored (`cli.respects_sigint`).
    self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
                      if signal.getsignal(s) is not signal.SIG_IGN}
    for s in self._previous:
      signal.signal(s, self._handle)
    self._unraisablehook = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    return self

  def _unraisable(self, unraisable):
    """Python drops an exception raised inside a callback it calls, e.g. a garbage collector's (JAX
    has one), and goes on: one of `_handle`'s is sent again (`cli.signals_not_dropped`), unless the
    run has moved to another phase meanwhile (`training` acts on a setup's signal itself)."""
    signum = signal_of(unraisable.exc_value)
    if signum is None:
      return self._unraisablehook(unraisable)
    phase = self._phase
    resend_later(signum, lambda: self._phase == phase)

  def training(self) -> None:
    """From here on a signal asks for a stop at the next step boundary. A setup's signal whose
    exception Python dropped, and that has not been sent again yet, stops the run here."""
    if self.signum is not None:
      self._phase = "stopping"
      self._stop_at_once(self.signum)
    self._phase = "training"

  def testing(self) -> None:
    """The run is trained and `last` final: a signal now stops the test (re-running tests again)."""
    self._phase = "testing"

  def closing(self) -> None:
    """The run is tested: a signal now stops the command at once (before test_metrics.json is
    written, re-running the command tests again)."""
    self._phase = "closing"

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self._phase not in ("training", "testing"):
      self.signum = signum
      self._stop_at_once(signum)
    if self.signum is None:
      self.signum = signum
      what = {"training": "stopping once the steps already under way are done, and saving a checkpoint",
              "testing": "stopping the test; the trained run is saved, and re-running the same command tests it"}
      _say(f"\n{name}: {what[self._phase]} (Ctrl-C again to quit at once)\n")
    elif self._saving:
      self._quit = signum
      _say(f"\n{name}: quitting as soon as the checkpoint being written is complete\n")
    else:
      self._quit_now(signum)

  @staticmethod
  def _quit_now(signum: int):
    """Ends the process with the signal's status (the command line says what was saved)."""
    if signum != signal.SIGINT:
      _say(f"\n{signal.Signals(signum).name} again: quitting now; what was already saved is intact\n")
    _StopRequest._stop_at_once(signum)

  @staticmethod
  def _stop_at_once(signum: int):
    """Raises what ends the command as the signal would: KeyboardInterrupt for SIGINT (status 130,
    and cli's "interrupted" line), SystemExit(128 + signum) otherwise."""
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    raise SystemExit(128 + signum)

  @contextlib.contextmanager
  def saving(self):
    self._saving = True
    try:
      yield
    finally:
      self._saving = False
    if self._quit:
      self._quit_now(self._quit)

  def __exit__(self, *exc):
    self._phase = "done"
    sys.unraisablehook = self._unraisablehook
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _say(message: str) -> None:
  """Writes from a signal handler: print() there can meet the main thread inside print() on the same
  stream and fail ("reentrant call"); one write() to the file descriptor cannot."""
  try:
    os.write(sys.stdout.fileno(), message.encode())
  except (AttributeError, OSError, ValueError):  # a stdout without a descriptor (e.g. under pytest)
    print(message, end="", flush=True)


def _primary() -> bool:
  """Whether this process writes the run's files (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def _same_on_every_process(value: str, what: str) -> None:
  """Stops every process, each with one line, unless all of them hold the same `value`: processes
  that train with different settings or data would silently average apart models."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
  digests = sharding_lib.gather_from_processes(digest)  # [processes, 32]
  others = [i for i, d in enumerate(digests) if (d != digests[0]).any()]
  if others:
    raise UserError(f"the processes have different {what}: process(es) {', '.join(map(str, others))} differ from "
                    f"process 0. Start every process with the same command (config and flags) and data.")


def _primary_first(fn: Callable[[], Any]) -> Any:
  """fn() on process 0 while the others wait for it (they get None): work that must be done once,
  e.g. writing the data cache. When it fails, process 0 leaves the run, which ends the others too
  (`sharding_lib.leave_run`)."""
  result = fn() if _primary() else None
  if jax.process_count() > 1:
    sharding_lib.gather_from_processes(np.int32(0))  # everyone waits here
  return result


# Evaluation batches between two checks that every process agrees there is no stop request (a
# collective): a stop during validation waits for about this many batches (at least a call's).
EVAL_AGREE_EVERY = 8


class _Discard:
  """A writer that writes nothing: metrics.jsonl's and TensorBoard's stand-in on processes other
  than 0."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


class _SaveTimer:
  """When `last` is due within an epoch: every `checkpoint_every_steps` steps or
  `checkpoint_every_minutes` minutes since the last save, whichever comes first (0 turns one off)."""

  def __init__(self, config: ml_collections.ConfigDict, step: int):
    self.every_steps = config.training.checkpoint_every_steps
    self.every_s = 60 * config.training.checkpoint_every_minutes
    self.saved(step)

  def saved(self, step: int) -> None:
    self.step, self.time = step, time.monotonic()

  def due_by_steps(self, step: int) -> bool:
    return bool(self.every_steps and step - self.step >= self.every_steps)

  def due_by_time(self) -> bool:
    """The clock's verdict, which processes may not share: a multi-process run agrees on it first."""
    return bool(self.every_s and time.monotonic() - self.time >= self.every_s)


def _split_sequences(config, corpus: data_lib.Corpus) -> np.ndarray:
  """The train split as [n, seq_length] sequences from its first token (with data.shift_windows each
  epoch cuts its own, as many, from its offset); every split checked for enough tokens."""
  L, B, shift = config.data.seq_length, config.training.batch_size, config.data.shift_windows
  for split, need, what in (("train", B * L + (L - 1 if shift else 0),
                             f"one batch of {B} sequences of data.seq_length = {L}"
                             + (" from any offset (data.shift_windows)" if shift else "")),
                            ("validation", 2, "one token to predict"), ("test", 2, "one token to predict")):
    if len(corpus.tokens[split]) < need:
      smaller = (", or a smaller --config.training.batch_size or --config.data.seq_length" if split == "train"
                 else "")
      raise data_lib.DataError(f"the {split} split has {len(corpus.tokens[split]):,} tokens: too few for {what}. "
                               f"Use more data{smaller}.")
  train = corpus.tokens["train"]
  return data_lib.sequences(train, L, count=data_lib.num_train_windows(len(train), L, shift))


def _init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of config with a GPT-2 checkpoint's shape and tokenizer when model.init_from names one."""
  if not config.model.init_from:
    return config
  from jaxlm import export
  config = config.copy_and_resolve_references()
  changes = []
  for key, value in export.gpt2_overrides(config.model.init_from).items():
    node, name = config_lib.lookup(config, key)
    if node[name] != value:
      changes.append(f"{key} = {value!r}")
      node[name] = value
  if changes:
    print(f"model.init_from {config.model.init_from}: {'; '.join(changes)}", flush=True)
  if config.data.seq_length > config.model.max_seq_length:
    raise config_lib.ConfigError(
        f"config key 'data.seq_length' = {config.data.seq_length} exceeds the {config.model.max_seq_length} "
        f"positions of model.init_from's model: add --config.data.seq_length={config.model.max_seq_length} (or less)")
  return config


@dataclasses.dataclass
class _Setup:
  """Everything a run derives from its config before it touches the work directory."""
  train: train_lib.Setup  # device, dtype, model, schedule, optimizer, the state's shapes and shardings
  corpus: data_lib.Corpus
  train_seqs: np.ndarray  # [n, seq_length], from the first token
  steps_per_epoch: int
  num_steps: int  # the schedule's length
  steps_per_call: int

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.train.config

  @property
  def data_name(self) -> str:
    return os.path.basename(self.corpus.path)

  @property
  def total_steps(self) -> int:
    return self.config.training.epochs * self.steps_per_epoch


def _setup(config: ml_collections.ConfigDict, resumed: dict | None, in_sweep: bool) -> _Setup:
  """`resumed`: the meta of the checkpoint the run will resume from (None for a new run), whose
  settings and corpus are checked before any data is prepared or any program compiled."""
  config_lib.use_compile_cache(config)
  # A device, a mesh, an attention kernel or cuBLAS matmuls that cannot work fail before the data is read.
  device = config_lib.select_device(config)
  config_lib.compute_dtype(config, device)
  config_lib.gpu_matmuls(config, device, 0.0)
  sharding_lib.make_mesh(config, config_lib.select_devices(config))

  def prepare():
    data_spec = data_lib.spec(config)  # hashes the corpus files: once
    if resumed:  # a resume that cannot go on stops before any tokenizing or compiling
      _check_resumable(config, resumed, data_lib.cache_name(*data_spec), config.workdir, in_sweep)
    return data_lib.load(config, data_spec, verbose=True)

  # Process 0 downloads and tokenizes; the others then read its cache (or, without a shared disk,
  # make the same one themselves).
  corpus = _primary_first(prepare)
  if corpus is None:
    corpus = data_lib.load(config)
  _same_on_every_process(data_lib.fingerprint(os.path.basename(corpus.path)), "data (the tokenized corpus)")
  train_seqs = _split_sequences(config, corpus)
  steps_per_epoch = data_lib.steps_per_epoch(len(train_seqs), config.training.batch_size)
  num_steps = train_lib.schedule_length(config, config.training.epochs * steps_per_epoch)
  with interrupt_after():  # (eager ops compile small XLA programs)
    train = train_lib.setup(config, corpus.vocab_size, num_steps)
  return _Setup(train, corpus, train_seqs, steps_per_epoch, num_steps,
                config_lib.steps_per_call(config, train.device, train.flops_per_device_step,
                                          config.training.epochs * steps_per_epoch))


def _fresh_state(s: _Setup, resumed: dict | None) -> train_lib.TrainState | None:
  """A new run's first state; None for a resumed run, which restores its checkpoint into the state's shapes
  instead (making a fresh one too would hold two states on the devices)."""
  if resumed is not None:
    return None
  with interrupt_after():  # XLA compiles it
    return train_lib.init_state(s.train)


def _print_setup(s: _Setup) -> None:
  t, L, ts = s.config.training, s.config.data.seq_length, s.train
  mesh = ts.mesh
  print(f"devices: {jax.devices()}; training on {mesh.size} x {ts.device.device_kind} ({ts.device.platform}) "
        f"in {jax.process_count()} process(es), mesh data {mesh.shape[sharding_lib.DATA]} x fsdp "
        f"{mesh.shape[sharding_lib.FSDP]}, compute dtype {jnp.dtype(ts.dtype).name}, {ts.model.attention} "
        f"attention" + (" (unfused in training: attention dropout)" if ts.model.attention_dropout else "")
        + f", {s.steps_per_call} step(s) per call, loss "
        + (f"in chunks of {ts.loss_chunk} tokens" if ts.loss_chunk else "on all logits at once")
        + (", cuBLAS matmuls" if ts.gpu_matmuls == "cublas" else ""), flush=True)
  print(f"config:\n{s.config}", flush=True)
  print(f"model: {ts.num_params:,} parameters, {ts.flops_per_token / 1e6:.1f} MFLOP per token (train)")
  print(f"data: {len(s.train_seqs):,} train sequences of {L} tokens -> {s.steps_per_epoch:,} steps per "
        f"epoch of batch {t.batch_size}; {s.total_steps:,} steps in {t.epochs} epochs; schedule "
        f"{s.num_steps:,} steps (warmup {t.warmup_steps:,})"
        + ("; the windows start at a new offset every epoch" if s.config.data.shift_windows else ""), flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, fresh: bool = False, in_sweep: bool = False) -> dict:
  """Trains, validates, checkpoints and tests as `config` says, in config.workdir; returns the run's
  summary. `fresh` moves an earlier run in that directory aside instead of resuming it. `in_sweep`:
  a sweep's point, whose messages leave out what only `jaxlm.main` can do (--fresh, a change of
  training.num_steps or of the work directory)."""
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(_StopRequest())
    config_lib.validate(config)
    config = _init_from(config)
    config_lib.validate(config)
    # A host's compile cache may be its own.
    _same_on_every_process(json.dumps({**config.to_dict(), "compile_cache_dir": ""}, sort_keys=True), "settings")

    def claim():  # the directory and its lock are process 0's
      if fresh:
        _move_aside(config.workdir)
      made = workdir_lib.create(config.workdir)
      stack.callback(workdir_lib.remove_if_unused, config.workdir, made)
      stack.enter_context(workdir_lib.Lock(config.workdir))  # before any work: a second run stops at once

    _primary_first(claim)
    resumed = _resumable_meta(config.workdir)
    setup = _setup(config, resumed, in_sweep)
    _print_setup(setup)
    run = _Run(setup, resumed, _fresh_state(setup, resumed), stop, stack, in_sweep)
    run.train()
    summary = run.test()
    if in_sweep and stop.signum:  # the point is complete; the stop is the sweep's, before its next point
      raise Interrupted(stop.signum, run.step)
    return summary


class _Run:
  """One training run in its work directory: the epoch loop and its policy (logging, saving,
  sampling, stopping), over the state and steps above."""

  def __init__(self, setup: _Setup, resumed: dict | None, fresh: train_lib.TrainState | None,
               stop: _StopRequest, stack: contextlib.ExitStack, in_sweep: bool):
    self.s, self.config, self.workdir, self.stop = setup, setup.config, setup.config.workdir, stop
    self.in_sweep = in_sweep
    self.checkpoints = stack.enter_context(checkpoint_lib.Checkpoints(self.workdir))
    self.state, self.loop = self._resume(resumed, fresh)
    self.tokenizer = setup.corpus.tokenizer()
    self.end_id = self.tokenizer.token_to_id(data_lib.END_OF_TEXT)
    self.step = int(self.state.step)
    self.jsonl, self.tb = _Discard(), _Discard()

    def open_files():  # process 0's
      # The config for people and tools (each checkpoint holds its own), the tokenizer for evaluate,
      # generate and export.
      workdir_lib.write_json(os.path.join(self.workdir, workdir_lib.CONFIG_FILE), self.config.to_dict())
      workdir_lib.write_atomically(os.path.join(self.workdir, workdir_lib.TOKENIZER_FILE), self.tokenizer.save)
      self.jsonl = metrics_lib.JsonlWriter(os.path.join(self.workdir, "metrics.jsonl"),
                                           keep_epochs_up_to=self.loop.epoch)
      self.tb = metrics_lib.TensorBoard(os.path.join(self.workdir, "tensorboard"), resume_step=self.step)
      stack.callback(self.tb.close)

    _primary_first(open_files)
    t, ts = self.config.training, setup.train
    self.progress = metrics_lib.Progress(setup.total_steps, t.batch_size * self.config.data.seq_length,
                                         ts.flops_per_token, ts.peak_flops)
    stack.enter_context(jax.default_device(ts.device))  # the odd host-side op (the schedule's value) too
    self.save_timer = _SaveTimer(self.config, self.step)
    self.replicated = sharding_lib.replicated(ts.mesh)
    # The train split stays on the devices (data.shift_windows: each epoch's windows, cut at its start).
    self.seqs = None if self.config.data.shift_windows else sharding_lib.put(setup.train_seqs, self.replicated)
    self.programs = {}  # steps per call -> the compiled train_steps
    self.eval_fn = evaluate_lib.make_eval_step(ts.model.apply, ts.mesh, ts.state_shardings.params)
    self.sampler, self.sample_prompt = self._make_sampler()
    stop.training()

  def _resume(self, resumed: dict | None, fresh: train_lib.TrainState | None
              ) -> tuple[train_lib.TrainState, LoopState]:
    """(state, LoopState) from the checkpoint the run resumes from (`resumed`: its meta), else the fresh ones."""
    if resumed is None:
      if self.config.model.init_from:
        from jaxlm import export
        params = export.load_gpt2_params(self.config.model.init_from, fresh.params)
        # In the state's layout (re-stacking scanned layers does not keep it).
        params = jax.device_put(params, self.s.train.state_shardings.params)
        return fresh.replace(params=params).restart_average(), LoopState()
      return fresh, LoopState()
    _report_changes(self.config, resumed, self.s.num_steps, self.in_sweep)
    name = self.checkpoints.resumable()
    state, meta = self.checkpoints.restore(name, self.s.train.abstract_state)
    # (a checkpoint saved before a field was added has the field's default)
    loop = LoopState(**{f.name: meta[f.name] for f in dataclasses.fields(LoopState) if f.name in meta})
    if name == "best":  # the epochs after it are trained again, as they were: the data order is (seed, step)'s
      print(f"{self.checkpoints.directory}/last is missing: resuming from `best` instead", flush=True)
    print(f"resuming from {self.checkpoints.directory}/{name}: {loop.epoch} epoch(s) done, step "
          f"{int(state.step):,}, best val loss {loop.best_val_loss}", flush=True)
    return state, loop

  def save(self, name: str, wait: bool = False, **extra) -> None:
    meta = {**dataclasses.asdict(self.loop), "global_step": self.step, "num_steps": self.s.num_steps,
            "config": self.config.to_dict(), "data": self.s.data_name, "vocab_size": self.s.corpus.vocab_size,
            **extra}
    self.checkpoints.save(name, self.state, meta, wait=wait)
    if name == "last":
      self.save_timer.saved(self.step)

  def interrupt(self) -> None:
    """Saves `last` where the run stands and stops."""
    with self.stop.saving():
      self.save("last")
    self.stopped()

  def stopped(self) -> None:
    """Stops the run for the signal received, once the saves in flight have completed (a failed
    one is reported instead)."""
    with self.stop.saving():
      self.checkpoints.wait()
    raise Interrupted(self.stop.signum, self.step)

  def train(self) -> None:
    t = self.config.training
    if self.loop.bad_epochs >= t.patience or self.loop.epoch >= t.epochs:
      print(f"the run in {self.workdir} is already complete ({self.loop.epoch} epochs)", flush=True)
    while self.loop.bad_epochs < t.patience and self.loop.epoch < t.epochs:
      t_epoch = time.perf_counter()
      steps_run, compile_s = self.train_epoch(self.loop.epoch + 1)
      self.end_epoch(self.loop.epoch + 1, t_epoch, steps_run, time.perf_counter() - t_epoch - compile_s)
      if self.agreed_stop():  # arrived while sampling, logging or saving: `last` is this epoch's
        self.stopped()
      self.progress.reset(self.step)

  def train_epoch(self, epoch: int) -> tuple[int, float]:
    """Trains to the end of `epoch` from where the run stands; (steps run, compile seconds)."""
    t, spe = self.config.training, self.s.steps_per_epoch
    first, end = (epoch - 1) * spe, epoch * spe  # the epoch's steps; self.step > first when resuming
    order = sharding_lib.put(data_lib.epoch_order(t.seed, epoch, len(self.s.train_seqs)).astype(np.int32),
                             self.replicated)
    seqs = self.epoch_sequences(epoch)
    steps_run, compile_s, pending, unlogged = 0, 0.0, [], None
    # One transfer per logging interval, [n] per call: the device runs ahead in between.
    fetch = lambda metrics: [dict(zip(m, v)) for m in jax.device_get(metrics) for v in zip(*m.values())]  # noqa: E731

    def log_unlogged():
      nonlocal unlogged
      if unlogged:
        self.log_steps(epoch, unlogged[0], fetch(unlogged[1]))
        unlogged = None

    while self.step < end:
      n = self._call_length(end)
      if n not in self.programs:  # before a compile, which restarts the progress line's clock
        log_unlogged()
      program, compile_s = self._program(n, seqs, order, compile_s)
      self.state, step_metrics = program(self.state, seqs, order, np.int32(self.step - first))
      pending.append(step_metrics)
      self.step, steps_run = self.step + n, steps_run + n
      log_unlogged()  # the interval before, fetched now that this call is queued
      boundary = self.step % t.log_every_steps == 0 or self.step == end
      # Several processes compare notes at log boundaries only; one checks after every call.
      agree = boundary or jax.process_count() == 1
      signum, late = self.agreed(self.save_timer.due_by_time()) if agree else (None, False)
      save_due = self.step != end and bool(signum or late or self.save_timer.due_by_steps(self.step))
      if save_due or self.step == end:
        self.log_steps(epoch, self.step, fetch(pending))
        pending = []
      elif boundary:
        # Logged once the next call is queued, so that the device does not wait for the host's log
        # (5 log lines cost the GPU config's epoch 46 ms on an H200); the divergence check that
        # log_steps makes still comes before any save.
        unlogged, pending = (self.step, pending), []
      if save_due:  # at an epoch's end, validate and save as usual first
        if signum:
          self.interrupt()
        self.save("last")
    return steps_run, compile_s

  def epoch_sequences(self, epoch: int) -> jax.Array:
    """[n, seq_length] train sequences of `epoch` on the devices: the split cut once, or with
    data.shift_windows cut anew from the epoch's offset (a host-to-device copy of the split)."""
    if self.seqs is not None:
      return self.seqs
    L, train = self.config.data.seq_length, self.s.corpus.tokens["train"]
    offset = data_lib.window_offset(self.config.training.seed, epoch, L)
    return sharding_lib.put(data_lib.sequences(train, L, offset, len(self.s.train_seqs)), self.replicated)

  def agreed(self, late: bool = False) -> tuple[int | None, bool]:
    """(the stop signal received, whether a minute-based save is `late`) as every process sees them:
    what any of them saw. Several processes call this at the same points (log boundaries, epoch
    ends, every few evaluation batches): a round of `gather_from_processes`. One process: as it sees them."""
    signum = self.stop.signum
    if jax.process_count() == 1:
      return signum, late
    seen = sharding_lib.gather_from_processes(np.array([signum or 0, late], np.int32)).max(axis=0)
    if seen[0] and signum is None:
      self.stop.signum = int(seen[0])  # another process's signal stops this one too
    return int(seen[0]) or None, bool(seen[1])

  def agreed_stop(self) -> int | None:
    return self.agreed()[0]

  def _call_length(self, end: int) -> int:
    """Steps in the next call: steps_per_call, or single steps up to the next point where the host
    must act (a log line, a save, the epoch's end) when a whole call would pass it."""
    t, k = self.config.training, self.s.steps_per_call
    stops = [end, (self.step // t.log_every_steps + 1) * t.log_every_steps]
    if t.checkpoint_every_steps:
      stops.append(self.save_timer.step + t.checkpoint_every_steps)
    return k if self.step + k <= min(stops) else 1

  def _program(self, num_steps: int, seqs, order, compile_s: float):
    """The compiled train_steps of `num_steps` updates (compiled on first use, and then said so);
    compile_s grows by the compile's seconds, kept out of the throughput figures."""
    if num_steps not in self.programs:
      self.programs[num_steps], seconds = train_lib.compile_train_steps(self.s.train, self.state, seqs, order,
                                                                        num_steps)
      print(f"compiled the train step ({num_steps} step(s) per call) in {seconds:.1f}s", flush=True)
      compile_s += seconds
      self.progress.reset(self.step)
    return self.programs[num_steps], compile_s

  def log_steps(self, epoch: int, step: int, host: list[dict]) -> None:
    """Adds the metrics of the steps up to `step` to the epoch's and to the logging interval's; at
    the interval's (or the epoch's) end, logs the interval's means to TensorBoard and prints a
    progress line. A stop's partial interval is kept in the checkpoint and logged by the resumed run."""
    t, end = self.config.training, epoch * self.s.steps_per_epoch
    self.checkpoints.check()  # a background save that failed stops the run here
    losses = [float(m["loss"]) for m in host]
    # A non-finite gradient makes the next parameters non-finite: caught here, before any save.
    bad = next((m for m in host if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]))), None)
    if bad is not None:
      raise TrainingError(
          f"the training diverged by step {step:,} (epoch {epoch}, loss {float(bad['loss'])}, gradient "
          f"norm {float(bad['grad_norm'])}, learning rate {float(bad['learning_rate']):.2e}). Nothing after "
          f"step {self.save_timer.step:,} was saved; the checkpoints in {self.workdir} are intact."
          + ("" if self.in_sweep else f" Lower --config.training.learning_rate (now {t.learning_rate}) or check "
             f"the data, then re-run to resume from `last`, or add --fresh to start over."))
    self.loop.train_loss_sum += math.fsum(losses)
    self.loop.train_steps += len(losses)
    self.loop.interval += [[loss, float(m["grad_norm"])] for loss, m in zip(losses, host)]
    if not (step % t.log_every_steps == 0 or step == end):
      return
    loss, grad_norm = np.mean(self.loop.interval, axis=0)
    means = {"loss": float(loss), "grad_norm": float(grad_norm), "learning_rate": float(host[-1]["learning_rate"])}
    self.loop.interval = []
    self.tb.scalars(step, {**means, **self.progress.rates(step)}, "train")
    if step % t.log_every_steps == 0:
      print(self.progress.line(epoch, t.epochs, step, means["loss"], means["learning_rate"], end - step), flush=True)

  def end_epoch(self, epoch: int, t_epoch: float, steps_run: int, train_s: float) -> None:
    """Validates, samples, logs and saves after `epoch`'s last step."""
    t, L = self.config.training, self.config.data.seq_length
    val = self.evaluate("validation")
    if val is None:  # stopped during evaluation
      self.interrupt()
    if not math.isfinite(val["loss"]):
      raise TrainingError(f"the validation loss is {val['loss']} after epoch {epoch}: training diverged."
                          + ("" if self.in_sweep else " Lower --config.training.learning_rate and re-run "
                             "with --fresh."))
    train_loss = self.loop.train_loss_sum / self.loop.train_steps
    self.loop.epoch, self.loop.train_loss_sum, self.loop.train_steps = epoch, 0.0, 0
    improved = self.loop.improve(val["loss"])
    tokens_per_s = steps_run * t.batch_size * L / train_s if steps_run else None
    record = {"epoch": epoch, "global_step": self.step, "train_loss": train_loss, "val_loss": val["loss"],
              "val_perplexity": val["perplexity"], "val_bpb": val["bpb"],
              "val_word_perplexity": val["word_perplexity"],
              "learning_rate": float(self.s.train.schedule(self.step - 1)),  # of the epoch's last update
              "epoch_time_s": time.perf_counter() - t_epoch, "tokens_per_s": tokens_per_s,
              "mfu": metrics_lib.mfu(tokens_per_s, self.s.train.flops_per_token, self.s.train.peak_flops),
              "best_val_loss": self.loop.best_val_loss, "improved": improved}
    self.jsonl.write(record)
    self.tb.scalars(self.step, {k: val[k] for k in evaluate_lib.METRICS}, "val")
    self.sample(epoch)
    # `best` first, complete before `last` starts: if the process dies between the two, `last` is
    # still the previous epoch's, and the resumed run redoes this epoch and finds `best` saved (after the
    # first epoch, with no `last` yet, it resumes from that `best`).
    with self.stop.saving():
      if improved:
        self.save("best", wait=True, val_loss=val["loss"])
      self.save("last", val_loss=val["loss"])
    verdict = (" | best, saved" if improved else
               f" | no improvement ({self.loop.bad_epochs}/{t.patience} epochs of patience)")
    print(f"epoch {epoch}/{t.epochs} | step {self.step:,} | train loss {train_loss:.4f} | val loss "
          f"{val['loss']:.4f} | val ppl {val['perplexity']:.2f} | val bpb {val['bpb']:.4f} | "
          f"{tokens_per_s or 0:,.0f} tok/s | {record['epoch_time_s']:.0f}s{verdict}", flush=True)
    if self.loop.bad_epochs >= t.patience:
      print(f"early stopping: no better validation loss for {t.patience} epochs", flush=True)

  def evaluate(self, split: str, params=None) -> dict | None:
    """Exact metrics of `split` (None if a stop was requested meanwhile)."""
    corpus = self.s.corpus
    # A batch that every device gets an equal share of; the padding windows are weighted 0.
    multiple = sharding_lib.batch_multiple(self.s.train.mesh)
    batch_size = -(-self.config.training.eval_batch_size // multiple) * multiple
    per_call = evaluate_lib.batches_per_call(self.s.train.device.platform)
    # Checked before each call; several processes compare notes about every EVAL_AGREE_EVERY batches
    # (they walk the same windows, so they call this at the same points).
    every, calls = (1 if jax.process_count() == 1 else max(1, EVAL_AGREE_EVERY // per_call)), itertools.count()
    stop = lambda: next(calls) % every == 0 and self.agreed_stop() is not None  # noqa: E731
    return evaluate_lib.evaluate(self.eval_fn, self.state.model_params if params is None else params,
                                 corpus.tokens[split], corpus.token_bytes, corpus.meta["splits"][split]["words"],
                                 self.config.data.seq_length, batch_size=batch_size, per_call=per_call, stop=stop,
                                 multiple=multiple)

  def _make_sampler(self) -> tuple:
    """(the jitted sampler, the prompt's ids) for samples while training; (None, None) when off."""
    s = self.config.sample
    if not s.max_new_tokens:
      return None, None
    prompt = generate_lib.encode_prompt(self.tokenizer, s.prompt, self.s.train.model.max_seq_length)
    sampler = generate_lib.make_sampler(self.s.train.model, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                        self.end_id)
    # Replicated output: every process can read the tokens, whatever the parameters' layout.
    return jax.jit(sampler, out_shardings=self.replicated), prompt

  def sample(self, epoch: int) -> None:
    """A sample from the fixed prompt, on the console and in TensorBoard (sample.* in the config)."""
    # Skipped when a stop is under way; several processes, which may not all know yet, all sample.
    if self.sampler is None or (self.stop.signum and jax.process_count() == 1):
      return
    tokens, lengths = self.sampler(self.state.model_params, *generate_lib.pad_prompts([self.sample_prompt]),
                                   self.config.sample.seed)
    (new,) = generate_lib.completions(tokens, lengths, [len(self.sample_prompt)], self.end_id)
    text = self.tokenizer.decode(self.sample_prompt + new)
    print(f"sample after epoch {epoch}: {text!r}", flush=True)
    self.tb.text(self.step, "sample", text)

  def test(self) -> dict:
    """Evaluates `best` on the test split; the run's summary, also in test_metrics.json."""
    if not self.checkpoints.exists("best"):  # saved at the first validation: since moved or deleted
      raise checkpoint_lib.CheckpointError(
          f"the run is trained ({self.loop.epoch} epoch(s), best epoch {self.loop.best_epoch}) but "
          f"{self.checkpoints.directory}/best, which the test measures, is missing (moved or deleted?). Put it "
          f"back and re-run the same command, or measure `last`: python -m jaxlm.evaluate "
          f"--workdir={self.workdir} --checkpoint=last")
    self.stop.testing()
    # The weights alone, beside the state: not a second optimizer state.
    params, _ = self.checkpoints.restore_params("best", self.s.train.abstract_state)
    test = self.evaluate("test", params)
    if test is None:
      self.stopped()  # `last` is final: re-running the command tests again
    self.stop.closing()
    if self.stop.signum:
      print("the test ended before the stop could: the run is complete", flush=True)
    # One step past the last: re-running a finished run (it tests again) hides the earlier points.
    self.tb.scalars(self.step + 1, {k: test[k] for k in evaluate_lib.METRICS}, "test")
    loop, t = self.loop, self.config.training
    summary = {"epochs": loop.epoch, "global_step": self.step, "stopped_early": loop.bad_epochs >= t.patience,
               "best_epoch": loop.best_epoch, "best_val_loss": loop.best_val_loss,
               "num_params": self.s.train.num_params,
               **{f"test_{k}": test[k] for k in evaluate_lib.METRICS},
               "test_mode": test["mode"], "device": self.s.train.device.device_kind,
               "devices": self.s.train.mesh.size}
    if _primary():
      workdir_lib.write_json(os.path.join(self.workdir, "test_metrics.json"), summary)
    print(evaluate_lib.summary_line(f"test (best epoch {loop.best_epoch})", test), flush=True)
    print("summary: " + json.dumps(summary), flush=True)
    return summary
