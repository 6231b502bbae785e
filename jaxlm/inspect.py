"""Prints what a run's checkpoints hold: python -m jaxlm.inspect runs/experiment_1"""
import sys

from jaxlm import checkpoint


def describe(workdir: str) -> str:
  checkpoints = checkpoint.Checkpoints(workdir, create=False)
  lines = []
  for name in checkpoint.NAMES:
    if checkpoints.step(name) is None:
      lines.append(f"{name}: none")
      continue
    meta = checkpoints.restore_meta(name)
    lines.append(f"{name}: epoch {meta['epoch']}, step {meta['global_step']:,}, val loss "
                 f"{meta.get('val_loss')}, best val loss {meta['best_val_loss']} (epoch {meta['best_epoch']}), "
                 f"epochs without improvement {meta['bad_epochs']}, "
                 f"{checkpoints.num_params(name):,} parameters")
  checkpoints.close()
  return f"{checkpoints.directory}\n" + "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m jaxlm.inspect WORKDIR")
  try:
    print(describe(sys.argv[1]))
  except checkpoint.CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
