"""Device memory of a training run at each epoch's start and at its final test, from the device's own
counters (`memory_stats`), to check that a resumed run holds one TrainState and that the test adds
only `best`'s weights. Run it twice on one work directory, the second time with more epochs (a
resume), each in a process of its own (the peak counter is per process):

    python experiments/resume_memory.py --config=configs/base.py:tiny --config.data.data_dir=... \
        --config.training.epochs=1
    python experiments/resume_memory.py ... --config.training.epochs=2

Prints one JSON line per point: the state's bytes, the device's bytes in use and its peak so far
(GPU and TPU; a CPU keeps no such counters: the bytes of the live arrays stand in for them).
"""
import gc
import json

import jax
from absl import flags
from ml_collections import config_flags

from jaxlm import cli
from jaxlm import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
flags.mark_flags_as_required(["config"])
MB = 2 ** 20


def report(at: str, state) -> None:
  gc.collect()
  stats = jax.local_devices()[0].memory_stats() or {}
  live = sum(dict((s.data.unsafe_buffer_pointer(), s.data.nbytes)  # orbax's save copies may share buffers
                  for a in jax.live_arrays() for s in a.addressable_shards).values())
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / MB
  print(json.dumps({"at": at, "state_mb": round(state_mb, 1), "live_arrays_mb": round(live / MB, 1),
                    "in_use_mb": round(stats.get("bytes_in_use", 0) / MB, 1),
                    "peak_mb": round(stats.get("peak_bytes_in_use", 0) / MB, 1),
                    "device": jax.local_devices()[0].device_kind}), flush=True)


def main(argv):
  del argv
  train_epoch, evaluate = run_lib._Run.train_epoch, run_lib._Run.evaluate

  def train_epoch_reported(self, epoch):
    report(f"epoch {epoch} start", self.state)
    return train_epoch(self, epoch)

  def evaluate_reported(self, split, params=None):
    if split == "test":
      report("test", self.state)
    return evaluate(self, split, params)

  run_lib._Run.train_epoch, run_lib._Run.evaluate = train_epoch_reported, evaluate_reported
  run_lib.train_and_evaluate(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main, config_flag="config")  # one `error:` line for a bad flag, config or corpus
