"""The command line: python -m jaxlm.main --config=configs/base.py [--config.training.learning_rate=5e-4]

Parses the flags and calls `run.train_and_evaluate`; every setting lives in the config.
"""
from absl import flags
from ml_collections import config_flags

from jaxlm import cli, run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/base.py (configs/base.py:tiny for a smoke run); "
    "override any value with --config.<group>.<key>=VALUE.", lock_config=True)
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Start a new run even if the work directory has a checkpoint (the old run is "
    "moved aside to <workdir>.old-<time>, not deleted). Without it, a run resumes from `last`.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  try:
    run.train_and_evaluate(_CONFIG.value, fresh=_FRESH.value)
  except run.Interrupted as e:
    print(f"{e}; the checkpoint `last` holds it. Re-run the same command to resume.", flush=True)
    raise SystemExit(128 + e.signum) from None


if __name__ == "__main__":
  cli.run(main, config_flag="config")
