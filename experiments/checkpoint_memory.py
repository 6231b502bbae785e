"""Host memory that each checkpoint save keeps: a config's whole TrainState saved again and again
through jaxlm's `Checkpoints` (orbax), waiting for each save, then the growth of the process's
anonymous resident memory (RssAnon) per save, after a garbage collection and malloc_trim (so that
memory the allocator merely holds is not counted). Linux only.

    python experiments/checkpoint_memory.py --config=configs/base.py --config.device=cpu --saves=500

--vocab_size sets the embedding's rows (no data is read). --nots_metrics measures without orbax's
raw-bytes metric, which calls tensorstore's `experimental_collect_matching_metrics` around every
save (that call leaks what it returns): it tells that leak from the rest. Prints one JSON line.
"""
import ctypes
import gc
import json
import os
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import host_memory
from jaxlm import checkpoint as checkpoint_lib
from jaxlm import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/base.py")
_SAVES = flags.DEFINE_integer("saves", 500, "Saves measured (after 50 that warm up).", lower_bound=1)
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "The embedding's rows.")
_TS_METRICS = flags.DEFINE_bool("ts_metrics", True, "Let orbax collect tensorstore's metrics around each save.")
flags.mark_flags_as_required(["config"])


def settled_kb() -> float:
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  return host_memory.rss_bytes(os.getpid()) / 1024


def main(argv):
  del argv
  if not _TS_METRICS.value:  # (a diagnosis only: orbax's private module, as orbax 0.12 has it)
    from orbax.checkpoint._src.serialization import tensorstore_utils
    tensorstore_utils.get_tensorstore_raw_bytes = lambda *args, **kwargs: 0
  s = train_lib.setup(_CONFIG.value, _VOCAB.value, 1000)
  state = train_lib.init_state(s)
  with tempfile.TemporaryDirectory() as workdir, checkpoint_lib.Checkpoints(workdir) as checkpoints:
    for step in range(50):
      checkpoints.save("last", state, {"global_step": step}, wait=True)
    before, objects, start = settled_kb(), len(gc.get_objects()), time.perf_counter()
    for step in range(_SAVES.value):
      checkpoints.save("last", state, {"global_step": step}, wait=True)
    seconds, after, objects = time.perf_counter() - start, settled_kb(), len(gc.get_objects()) - objects
  n, leaves = _SAVES.value, jax.tree.leaves(state)
  print(json.dumps({"arrays": len(leaves), "state_mb": round(sum(x.nbytes for x in leaves) / 2 ** 20, 1),
                    "saves": n, "ms_per_save": round(1000 * seconds / n, 1),
                    "kb_kept_per_save": round((after - before) / n, 2),
                    "gc_objects_kept_per_save": round(objects / n, 1), "ts_metrics": _TS_METRICS.value,
                    "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  app.run(main)
