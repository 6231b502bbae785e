"""Prints what a run's checkpoints hold: python -m jaxlm.inspect runs/experiment_1"""
from jaxlm import checkpoint, cli


def describe(workdir: str) -> str:
  checkpoints = checkpoint.Checkpoints(workdir, writer=False)
  try:
    if not any(checkpoints.exists(name) for name in checkpoint.NAMES):
      raise checkpoint.CheckpointError(f"no checkpoints in {checkpoints.directory}: is {workdir} a run's "
                                       "work directory (config.workdir)?")
    lines = [checkpoints.directory]
    for name in checkpoint.NAMES:
      if not checkpoints.exists(name):
        lines.append(f"{name}: none")
        continue
      meta = checkpoints.restore_meta(name)
      where = (f"after epoch {meta['epoch']}" if "val_loss" in meta else
               f"in epoch {meta['epoch'] + 1}")  # a mid-epoch save has no validation yet
      val = f"val loss {meta['val_loss']:.4f}, " if "val_loss" in meta else ""
      best = (f"best val loss {meta['best_val_loss']:.4f} (epoch {meta['best_epoch']})"
              if meta["best_val_loss"] is not None else "no validation yet")
      lines.append(f"{name}: {where}, step {meta['global_step']:,}, {val}{best}, epochs without "
                   f"improvement {meta['bad_epochs']}, {checkpoints.num_params(name):,} parameters")
    return "\n".join(lines)
  finally:
    checkpoints.close()


def main(argv) -> None:
  print(describe(argv[1]))


if __name__ == "__main__":
  cli.run(main, nargs=1, usage="usage: python -m jaxlm.inspect WORKDIR")
