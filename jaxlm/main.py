"""The command line: python -m jaxlm.main --config=configs/base.py [--config.training.learning_rate=5e-4]

Parses the flags and calls `run.train_and_evaluate`; every setting lives in the config. A run over
several processes (hosts) starts one such command per process, with --distributed on a cluster JAX
detects (SLURM, Cloud TPU, ...) or --coordinator_address/--num_processes/--process_id elsewhere.
"""
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from jaxlm import cli, run, sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/base.py (configs/base.py:tiny for a smoke run); "
    "override any value with --config.<group>.<key>=VALUE.", lock_config=True)
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Start a new run even if the work directory has a checkpoint (the old run is "
    "moved aside to <workdir>.old-<time>, not deleted). Without it, a run resumes from `last` (or "
    "`best` when `last` is gone).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the other processes of a multi-host run as the cluster environment "
    "says (SLURM, Open MPI, Cloud TPU, ...: what jax.distributed.initialize() detects).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "A multi-process run without a detected cluster: host:port of process 0, "
    "the same for every process (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes the run has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  try:
    sharding.initialize_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    if jax.process_index() > 0:  # process 0 speaks for the run; errors still reach stderr
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    run.train_and_evaluate(_CONFIG.value, fresh=_FRESH.value)
  except run.Interrupted as e:  # every process stops here together
    print(f"{e}; the checkpoint `last` holds it. Re-run the same command to resume.", flush=True)
    raise SystemExit(128 + e.signum) from None
  except BaseException as e:  # this process alone (an error, a Ctrl-C while setting up): the others stop too
    sharding.leave_run(e)
    raise


def command() -> None:
  """`python -m jaxlm.main`: `main` with the command line's one-line errors, ending without Python's
  teardown in a process that left a run of several processes early (`sharding.end_if_left`)."""
  try:
    cli.run(main, config_flag="config")
  except BaseException as e:
    sharding.end_if_left(e)
    raise


if __name__ == "__main__":
  command()
