"""Prints what a run's checkpoints hold: python -m jaxlm.inspect runs/experiment_1"""
import sys

from jaxlm import checkpoint


def describe(workdir: str) -> str:
  checkpoints = checkpoint.Checkpoints(workdir, create=False)
  try:
    if all(checkpoints.step(name) is None for name in checkpoint.NAMES):
      raise checkpoint.CheckpointError(f"no checkpoints in {checkpoints.directory}: is {workdir} a run's "
                                       "work directory (config.workdir)?")
    lines = [checkpoints.directory]
    for name in checkpoint.NAMES:
      if checkpoints.step(name) is None:
        lines.append(f"{name}: none")
        continue
      meta = checkpoints.restore_meta(name)
      where = (f"after epoch {meta['epoch']}" if "val_loss" in meta else
               f"interrupted in epoch {meta['epoch'] + 1}")  # a mid-epoch save has no validation yet
      val = f"val loss {meta['val_loss']:.4f}, " if "val_loss" in meta else ""
      best = (f"best val loss {meta['best_val_loss']:.4f} (epoch {meta['best_epoch']})"
              if meta["best_val_loss"] is not None else "no validation yet")
      lines.append(f"{name}: {where}, step {meta['global_step']:,}, {val}{best}, epochs without "
                   f"improvement {meta['bad_epochs']}, {checkpoints.num_params(name):,} parameters")
    return "\n".join(lines)
  finally:
    checkpoints.close()


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m jaxlm.inspect WORKDIR")
  try:
    print(describe(sys.argv[1]))
  except checkpoint.CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
