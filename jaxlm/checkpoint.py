"""The run's two orbax checkpoints: `<workdir>/checkpoints/last` (every epoch, and every
`training.checkpoint_every_*` within one) and `best` (when the validation loss improves).

Each holds the whole TrainState (params, optimizer state with the schedule's step count, dropout
key, and with training.ema_decay the parameters' moving average) and a JSON `meta` with everything
else a resume needs: epoch, global step (which is also the data position: the batch order is a pure
function of seed and step), best validation loss, the early-stopping counter, the partial epoch's
loss sums, the config and the vocabulary size. Each has its own manager keeping one checkpoint, so
neither can evict the other (google/orbax#526). Orbax's step numbers count the saves (1, 2, ...):
one training step can be saved twice, e.g. before and after its epoch's validation, and the newest
always wins. Orbax writes a save into a temporary folder and
renames it when complete: a crash mid-save leaves the previous one intact, and the next run that
writes here removes the leftover temporary folder.

Saves run in the background. A save that fails there (a full disk, a lost permission) is reported by
the next `save`, `check` or `close` as one CheckpointError, so that a run never trains on without
its checkpoints. Inference needs only `restore_params`, which reads the model's weights (their moving
average when the run kept one) and no optimizer state.
"""
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.cli import UserError, out_of_memory

NAMES = ("last", "best")


class CheckpointError(UserError):
  """A checkpoint that cannot be used or written; the message says what to do."""


def cause(error: BaseException) -> str:
  """A short reason for an I/O failure: the OS error when one is inside (orbax and tensorstore wrap
  them in other types), else the exception's first line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:300]}"


class Checkpoints:
  """`last` and `best` of one work directory. A writer (the training run, which holds the work
  directory's lock) also cleans up what an interrupted save left; a reader never writes."""

  def __init__(self, workdir: str, writer: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=writer, read_only=not writer,
                                           cleanup_tmp_directories=writer)
    self._managers = {
        name: ocp.CheckpointManager(os.path.join(self.directory, name), options=options, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        for name in NAMES}
    self._saving = {}  # name -> (orbax step number, training step) of a save that may still be running

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(raise_errors=exc_type is None)  # an error already on its way is the one to report

  def exists(self, name: str) -> bool:
    return self._managers[name].latest_step() is not None

  def resumable(self) -> str | None:
    """The checkpoint a run resumes from: `last`, else `best` (a whole state too, at the end of its
    epoch: `last` is missing after a kill between the first epoch's two saves, or when moved away),
    else None: a new run."""
    for path in (self.directory, *(os.path.join(self.directory, name) for name in NAMES)):
      if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory, where orbax keeps the checkpoints: move it out of the "
                              f"way and re-run")
    return next((name for name in NAMES if self.exists(name)), None)

  def step(self, name: str) -> int | None:
    """The training step the `name` checkpoint holds, or None when there is none."""
    return self.restore_meta(name)["global_step"] if self.exists(name) else None

  def save(self, name: str, state, meta: dict, wait: bool = False) -> None:
    """Saves in the background, or before returning with `wait`; the arrays are copied off the
    device before it returns, so the caller may donate them at once. Raises CheckpointError for
    this save or an earlier one that failed."""
    self.check()
    manager = self._managers[name]
    number = (manager.latest_step() or 0) + 1
    try:
      saved = manager.save(number, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                           meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax raises many types; the cause is an I/O error in practice
      raise self._save_failed(name, meta["global_step"], e) from None
    if not saved:
      raise CheckpointError(f"orbax did not save step {meta['global_step']} in {self.directory}/{name}")
    self._saving[name] = (number, meta["global_step"])
    if wait:
      self._wait(name)

  def check(self) -> None:
    """Raises CheckpointError if a background save has failed (orbax keeps such an error for the
    next wait: it is waited for here once it has ended, which returns at once)."""
    for name in list(self._saving):
      if not self._managers[name].is_saving_in_progress():
        self._wait(name)

  def restore(self, name: str, target) -> tuple:
    """(state shaped and placed like `target`, meta) of the `name` checkpoint. A target without a
    moving average (ema_params None) also reads checkpoints saved before the TrainState had one."""
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=getattr(target, "ema_params", None) is None)
    restored = self._newest(name, lambda number: self._restore(name, number, state=args, meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_params(self, name: str, like=None) -> tuple:
    """(the model's weights, meta) of the `name` checkpoint: the moving average of the parameters
    when the run kept one (training.ema_decay), else the parameters. The optimizer state is not read.
    As numpy arrays; or, given `like` (a TrainState, or its shapes and shardings), as arrays of the
    dtypes and shardings of its `ema_params` or `params`."""

    def read(number):
      key, tree = self._params_metadata(name, number)
      if like is None:
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
      else:  # (a run without a moving average reads one into its parameters' dtype)
        shapes = like.params if getattr(like, key) is None else getattr(like, key)
        restore_args = ocp.checkpoint_utils.construct_restore_args(shapes)
      args = ocp.args.PyTreeRestore(item={key: shapes}, restore_args={key: restore_args}, partial_restore=True)
      restored = self._restore(name, number, state=args, meta=ocp.args.JsonRestore())
      return restored.state[key], restored.meta

    return self._newest(name, read)

  def restore_meta(self, name: str) -> dict:
    return self._newest(name, lambda number: self._restore(name, number, meta=ocp.args.JsonRestore())).meta

  def path(self, name: str) -> str:
    """The folder of the `name` checkpoint."""
    return os.path.join(self.directory, name, str(self._require(name)))

  def num_params(self, name: str) -> int:
    """Parameter count read from the checkpoint's metadata, without loading the arrays."""
    _, tree = self._newest(name, lambda number: self._params_metadata(name, number))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))

  def wait(self) -> None:
    """Waits for the saves in flight; CheckpointError for one that failed."""
    for name in NAMES:
      self._wait(name)

  def close(self, raise_errors: bool = True) -> None:
    """Waits for the saves in flight; raises CheckpointError for one that failed (unless told not
    to: when another error is already being reported)."""
    try:
      self.wait()
    except CheckpointError:
      if raise_errors:
        raise
    finally:
      for manager in self._managers.values():
        manager.close()

  def _wait(self, name: str) -> None:
    """Waits for `name`'s save in flight; CheckpointError unless it was committed."""
    if name not in self._saving:
      return
    manager = self._managers[name]
    number, step = self._saving.pop(name)
    try:
      manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(name, step, e) from None
    if manager.latest_step() != number:
      raise self._save_failed(name, step, RuntimeError("orbax did not commit it (--verbose shows its log)"))

  def _newest(self, name: str, read):
    """read(number) of the newest `name` checkpoint; once more when a run saving beside this reader
    replaced it meanwhile (it deletes the old one as soon as the new one is complete)."""
    number = self._require(name)
    try:
      return read(number)
    except CheckpointError:
      self._managers[name].reload()
      if self._managers[name].latest_step() in (None, number):
        raise
      return read(self._require(name))

  def _restore(self, name: str, number: int, **items):
    try:
      return self._managers[name].restore(number, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for missing or damaged files
      if out_of_memory(e):  # the device's memory, not the checkpoint: the command says what to do
        raise
      raise self._unreadable(name, number, e) from None

  def _params_metadata(self, name: str, number: int) -> tuple:
    """("ema_params" or "params": the model's weights, their metadata tree)."""
    try:
      state = self._managers[name].item_metadata(number).state
      key = "params" if state.get("ema_params") is None else "ema_params"
      return key, state[key]
    except Exception as e:
      raise self._unreadable(name, number, e) from None

  def _require(self, name: str) -> int:
    """The orbax step number of the `name` checkpoint."""
    number = self._managers[name].latest_step()
    if number is None:
      raise CheckpointError(f"no '{name}' checkpoint in {self.directory}")
    return number

  def _save_failed(self, name: str, step: int, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"saving checkpoint `{name}` (step {step:,}) in {self.directory} failed: {cause(error)}. The "
        f"checkpoints saved before it are intact: fix the cause (free disk space, permissions) and "
        f"re-run the same command to resume from them.")

  def _unreadable(self, name: str, number: int, error: Exception) -> CheckpointError:
    path = os.path.join(self.directory, name, str(number))
    return CheckpointError(
        f"checkpoint {path} cannot be read ({cause(error)}). It may be damaged or from an incompatible "
        f"version. Move it out of the way (nothing is deleted) and re-run: training resumes from the other "
        f"checkpoint (`last` or `best`) if that one is intact.")
