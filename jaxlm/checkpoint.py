"""The run's two orbax checkpoints: `<workdir>/checkpoints/last` (every epoch) and `best` (when the
validation loss improves).

Each holds the whole TrainState (params, optimizer state with the schedule's step count, dropout
key) and a JSON `meta` with everything else a resume needs: epoch, global step (which is also the
data position: the batch order is a pure function of seed and step), best validation loss, the
early-stopping counter, the partial epoch's loss sums, and the config. Each has its own manager
keeping one step, so neither can evict the other (google/orbax#526). Orbax writes a step into a
temporary folder and renames it when complete: a crash mid-save leaves the previous one intact.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

NAMES = ("last", "best")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says what to do."""


class Checkpoints:

  def __init__(self, workdir: str, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
    self._managers = {
        name: ocp.CheckpointManager(os.path.join(self.directory, name), options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        for name in NAMES}

  def step(self, name: str) -> int | None:
    """The step of the `name` checkpoint, or None when there is none."""
    return self._managers[name].latest_step()

  def save(self, name: str, state, meta: dict, wait: bool = False) -> bool:
    """Saves in the background (the next save or `close` waits for it), or before returning with
    `wait`. False, saving nothing, when `name` already holds this step."""
    manager, step = self._managers[name], int(state.step)
    if manager.latest_step() == step:
      return False
    if not manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta))):
      raise CheckpointError(f"orbax did not save step {step} in {self.directory}/{name}")
    if wait:
      manager.wait_until_finished()
    return True

  def restore(self, name: str, target) -> tuple:
    """(state shaped and placed like `target`, meta) of the `name` checkpoint."""
    step = self._require(name)
    try:
      restored = self._managers[name].restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for missing or damaged files
      raise self._unreadable(name, step, e) from None
    return restored.state, restored.meta

  def restore_meta(self, name: str) -> dict:
    step = self._require(name)
    try:
      return self._managers[name].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise self._unreadable(name, step, e) from None

  def num_params(self, name: str) -> int:
    """Parameter count read from the checkpoint's metadata, without loading the arrays."""
    step = self._require(name)
    try:
      tree = self._managers[name].item_metadata(step).state["params"]
    except Exception as e:
      raise self._unreadable(name, step, e) from None
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()

  def _require(self, name: str) -> int:
    step = self.step(name)
    if step is None:
      raise CheckpointError(f"no '{name}' checkpoint in {self.directory}")
    return step

  def _unreadable(self, name: str, step: int, error: Exception) -> CheckpointError:
    path = os.path.join(self.directory, name, str(step))
    return CheckpointError(
        f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:300]}). It may be "
        f"damaged or from an incompatible version. Move it out of the way (nothing is deleted), or "
        f"start a fresh run with --fresh or another --config.workdir.")
