"""Where a run's arrays live: a mesh over every device of every process, and the shardings of the
TrainState and of the batches on it.

The mesh has two axes. Both split the batch; they differ in what they do with the state:
- `data` replicates parameters and optimizer state (pure data parallel: XLA all-reduces the
  gradients);
- `fsdp` shards them too (ZeRO-3 style: XLA gathers each weight where it is used and
  reduce-scatters its gradient), so that a model too large for one device's memory still trains.
The steps in `jaxlm.train` stay as they are: they are jitted with these shardings and XLA inserts
the collectives. With one device everything below is the identity.

Devices are laid out process by process (`jax.devices()` order), `fsdp` the faster-varying axis:
with fsdp no larger than a host's devices, the weight gathers stay inside a host and only the
gradients of the `data` axis cross hosts.
"""
import itertools
import json
import os
import signal
import sys
import threading
import traceback

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm.cli import UsageError, UserError, interrupt_after, respects_sigint

DATA, FSDP = "data", "fsdp"
BATCH = (DATA, FSDP)  # the batch axis is split over both mesh axes

# Leaves smaller than this stay replicated on `fsdp` too: biases, LayerNorm scales, scalars. Sharding
# them saves little memory and costs a collective each.
MIN_SHARDED_SIZE = 2**14


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from mesh.data and mesh.fsdp (-1: the devices the other leaves)."""
  data, fsdp = config.mesh.data, config.mesh.fsdp  # not both -1 (config.validate)
  for key, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if size != -1 and num_devices % size:
      raise config_lib.ConfigError(f"config key '{key}' = {size} does not divide the {num_devices} devices "
                                   f"of this run: use a divisor of {num_devices}, or -1 for what the other "
                                   f"axis leaves")
  data = num_devices // fsdp if data == -1 else data
  fsdp = num_devices // data if fsdp == -1 else fsdp
  if data * fsdp != num_devices:
    raise config_lib.ConfigError(
        f"config keys 'mesh.data' x 'mesh.fsdp' = {data} x {fsdp} = {data * fsdp} devices, but this run has "
        f"{num_devices}: make the product {num_devices}, or set one of them to -1")
  return data, fsdp


def make_mesh(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> Mesh:
  """The run's data x fsdp mesh over `devices`; a batch the mesh cannot split evenly is a ConfigError."""
  data, fsdp = mesh_shape(config, len(devices))
  batch_size = config.training.batch_size
  if batch_size % (data * fsdp):
    raise config_lib.ConfigError(
        f"config key 'training.batch_size' = {batch_size} (the global batch) must be divisible by the "
        f"{data * fsdp} devices it is split over (mesh.data x mesh.fsdp = {data} x {fsdp}): use a multiple "
        f"of {data * fsdp}, or fewer devices (e.g. CUDA_VISIBLE_DEVICES)")
  # jax.make_mesh orders the devices by the chips' topology where it matters (TPU slices); on GPUs
  # it keeps jax.devices()' order, process by process.
  return jax.make_mesh((data, fsdp), (DATA, FSDP), (AxisType.Auto, AxisType.Auto), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch(mesh: Mesh) -> NamedSharding:
  """[B, ...] arrays split over every device along B."""
  return NamedSharding(mesh, PartitionSpec(BATCH))


def batches(mesh: Mesh) -> NamedSharding:
  """[K, B, ...] arrays, K batches each split like `batch`."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH))


def batch_multiple(mesh: Mesh) -> int:
  """Batches must be a multiple of this: the devices the batch axis is split over."""
  return mesh.shape[DATA] * mesh.shape[FSDP]


def _leaf_spec(path, leaf, fsdp: int) -> PartitionSpec:
  """A parameter-shaped leaf's largest axis that `fsdp` divides, sharded over `fsdp`; replicated
  when there is none or the leaf is small. The layer axis of scanned layers' stacked parameters
  (under `blocks`) is never sharded: the scan takes one layer's slice at a time."""
  if fsdp == 1 or leaf.size < MIN_SHARDED_SIZE:
    return PartitionSpec()
  stacked = any(getattr(k, "key", None) == "blocks" for k in path)
  axes = sorted(range(1 if stacked else 0, leaf.ndim), key=lambda a: -leaf.shape[a])
  for axis in axes:
    if leaf.shape[axis] % fsdp == 0:
      return PartitionSpec(*[FSDP if a == axis else None for a in range(leaf.ndim)])
  return PartitionSpec()


def state_shardings(mesh: Mesh, abstract_state):
  """NamedShardings for every leaf of a state (from jax.eval_shape): replicated over `data`, and
  over `fsdp` by `_leaf_spec`. The optimizer's moments follow their parameters' shapes, so they are
  sharded alike."""
  fsdp = mesh.shape[FSDP]
  return jax.tree_util.tree_map_with_path(lambda path, leaf: NamedSharding(mesh, _leaf_spec(path, leaf, fsdp)),
                                          abstract_state)


def initialize_processes(coordinator_address: str, num_processes: int | None, process_id: int | None,
                         cluster: bool) -> None:
  """Joins this process to a run over several processes (jax.distributed), before JAX is used:
  explicitly (the coordinator's host:port, how many processes, which one this is) or, with
  `cluster`, as the cluster environment says (SLURM, Open MPI, Cloud TPU and the others JAX
  detects). Without either, a run is one process and nothing happens."""
  explicit = (coordinator_address, num_processes is not None, process_id is not None)
  if not any(explicit) and not cluster:
    return
  if any(explicit) and not all(explicit):
    raise UsageError("--coordinator_address, --num_processes and --process_id go together: give all three "
                     "(or --distributed alone on a cluster JAX detects)")
  host, _, port = coordinator_address.rpartition(":")
  if coordinator_address and not (host and port.isdigit()):
    raise UsageError(f"--coordinator_address={coordinator_address}: write process 0's host:port, e.g. node0:7777")
  if process_id in (None, 0):  # before stdout is left to process 0 alone: the others keep quiet already
    how = f"{num_processes} through {coordinator_address}" if all(explicit) else "as the cluster says"
    print(f"joining the run's processes ({how}; JAX waits up to 5 minutes for all of them)", flush=True)
  # JAX waits in C++ for the others, where Python runs no signal handler: a Ctrl-C kills the process
  # at once instead (nothing is written yet), not after the wait.
  previous = signal.signal(signal.SIGINT, signal.SIG_DFL if respects_sigint() else signal.SIG_IGN)
  try:
    if all(explicit):
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise UserError(f"could not join the run's processes ({str(e).strip().splitlines()[0][:300]}): check that "
                    f"every process got the same --coordinator_address (host:port of process 0, reachable "
                    f"from all) and --num_processes, and its own --process_id") from None
  finally:
    signal.signal(signal.SIGINT, previous)
  global _watch
  _watch = threading.Thread(target=_watch_departures, name="jaxlm-departures", daemon=True,
                            args=(jax._src.distributed.global_state.client, jax.process_index()))
  _watch.start()
  with interrupt_after():  # the devices of every process, exchanged: one leaving half-way would hang the others
    jax.devices()
  # Orbax's barriers are device collectives unless told to use the coordination service, as jaxlm's
  # own agreements do (`gather_from_processes`): one from its background save thread could run
  # beside a train step's collectives in another order on each process.
  from absl import flags
  from orbax.checkpoint import multihost  # noqa: F401  (defines the flag)
  flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


# Numbers the rounds of `gather_from_processes`: every process counts the same rounds in the same
# order (one per call), so round n's keys in the coordination service meet across processes.
_ROUNDS = itertools.count()
_LEFT = "jaxlm/left/"  # + a process's index -> why it left the run (`leave_run`)


def gather_from_processes(values) -> np.ndarray:
  """[processes, ...] of every process's `values` (a few small integers), in process order, once all
  of them have called this. It goes through JAX's coordination service (its key-value store), not
  a device collective: the host does not wait for the device's queue, and no collective program of
  ours runs beside the train step's (suspected, not shown, in the two-process CPU runs with 2
  devices each that hung 5 of 5 times one day, agreeing through `process_allgather`, and 0 of 4 the
  next)."""
  client = jax._src.distributed.global_state.client  # no public accessor in JAX; orbax reads the same
  values = np.asarray(values)
  n, me = next(_ROUNDS), jax.process_index()
  client.key_value_set(f"jaxlm/round/{n}/{me}", json.dumps(values.tolist()))
  got = [json.loads(_wait_for_key(client, f"jaxlm/round/{n}/{p}")) for p in range(jax.process_count())]
  if n:  # every process has set round n's key, so has read all of round n-1's
    client.key_value_delete(f"jaxlm/round/{n - 1}/{me}")
  return np.array(got, values.dtype)


def _wait_for_key(client, key: str) -> str:
  """The key's value once another process sets it, however long that takes (process 0 may spend
  minutes preparing the data). Waits a second at a time, so that a Ctrl-C's handler runs between two
  waits. (A process that left the run ends this one's wait through `_watch_departures`.)"""
  while True:
    try:
      return client.blocking_key_value_get(key, 1000)
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise


# Taken, and kept, by whichever ends this process first: its main thread (leaving the run early,
# `leave_run`, or ending with the others, `end_if_left`) or another process's leaving
# (`_watch_departures`), so that the process ends one way, with one message.
# Reentrant: a Ctrl-C that lands between leave_run's taking it and setting _LEAVING sends the main
# thread to end_if_left, which takes it again instead of waiting on itself.
_ENDING = threading.RLock()
_LEAVING = threading.Event()  # this process has left the run early (`leave_run`)
_STAND_DOWN = threading.Event()  # this process ends with the others: the departures' watch stops (`end_if_left`)
_watch: threading.Thread | None = None  # the thread of `_watch_departures`, started by `initialize_processes`


def _watch_departures(client, me: int) -> None:
  """Runs in a thread of every process of a multi-process run: ends this process within a second or
  two of another one leaving the run (`leave_run`), whatever its main thread waits on then (a round
  of `gather_from_processes`, one of orbax's barriers, or the devices, whose steps wait for the
  collectives of a process that will not run them: a CPU's dispatch, or a full queue, blocks the host
  there too, and Python's teardown would wait for them for ever)."""
  while not _STAND_DOWN.wait(1):
    try:
      left = {int(k.rpartition("/")[2]): why for k, why in client.key_value_dir_get(_LEFT)}
    except Exception:  # noqa: BLE001
      if jax._src.distributed.global_state.client is None:  # shut down: the command has ended
        return
      continue  # the service unreachable for now (or for good: then JAX says so and ends the process)
    others = {p: why for p, why in left.items() if p != me}
    if not others:
      continue
    if not _ENDING.acquire(blocking=False):  # this process is ending already, on its own
      return
    try:
      who = min(others)
      print(f"error: process {who} left the run ({others[who]}); its output says more", file=sys.stderr, flush=True)
    finally:
      _end_now(1)


def _end_now(status: int) -> None:
  """Ends a process of a run that some process left early: JAX's exit barrier with the others (where
  the one that left waits for those that learn it, and they for it), then the exit without Python's
  teardown, which waits for the device's threads, stuck in collectives with processes that are gone
  (for ever on a CPU, measured), or aborts."""
  try:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):  # a reader gone (`| tee` stopped too), a closed stream
        pass
    jax.distributed.shutdown()
  finally:
    os._exit(status)


def leave_run(e: BaseException) -> None:
  """Tells the other processes that this one is leaving the run early (`e`: an error, a Ctrl-C):
  each ends within a second or two (`_watch_departures`), instead of waiting for this one until one
  of JAX's or orbax's 5-minute timeouts aborts every process."""
  if _LEAVING.is_set():
    return
  _ENDING.acquire()  # held for good; blocks for good if `_watch_departures` is ending the process
  _LEAVING.set()
  client = jax._src.distributed.global_state.client
  if client is None:  # one process, or not joined yet
    return
  if isinstance(e, KeyboardInterrupt):
    why = "interrupted by SIGINT"
  elif isinstance(e, SystemExit) and e.code in {128 + s for s in signal.Signals}:  # (_StopRequest's)
    why = f"stopped by {signal.Signals(e.code - 128).name}"
  else:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  try:
    client.key_value_set(f"{_LEFT}{jax.process_index()}", why)
  except Exception:  # noqa: BLE001  (the service is gone: the others learn it from JAX)
    pass


def end_if_left(e: BaseException) -> None:
  """Called as the command ends (`e`: how, a SystemExit or an exception whose traceback Python would
  print). In a process that left a run of several processes early (`leave_run`), ends it now, with
  the status Python would give it. Otherwise returns, the departures' watch standing down (or
  blocks, for good, while that watch ends this process)."""
  if jax._src.distributed.global_state.client is None:
    return
  if not _LEAVING.is_set():
    _ENDING.acquire()
    _stand_down()
    return
  if isinstance(e, SystemExit):
    if e.code is None or isinstance(e.code, int):
      _end_now(e.code or 0)
    print(e.code, file=sys.stderr)
  else:
    traceback.print_exception(e)
  _end_now(130 if isinstance(e, KeyboardInterrupt) else 1)


def _stand_down() -> None:
  """Stops the departures' watch and waits until it has, before Python's teardown: a thread that is
  inside one of the coordination client's calls then aborts the whole process ("terminate called
  after throwing an instance of ''"; 12 of 12 two-process runs whose watch polled without a pause,
  and once in CI with its one poll a second), even after a run that went well."""
  _STAND_DOWN.set()
  if _watch is not None:
    _watch.join(timeout=60)  # one call to the service: milliseconds while the others are still there


def check_fits(abstract_state, shardings, mesh: Mesh) -> None:
  """ConfigError when the state laid out by `shardings` cannot fit in a device's memory (a GPU's
  allocator limit; on a CPU, the machine's memory shared by its devices): said before XLA tries,
  which on a CPU can wait forever on a program whose buffers it could not allocate."""
  per_device = sum(int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
                   for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)))
  device = mesh.devices.flat[0]
  have, what = memory_limit(device)
  if device.platform == "cpu":  # the devices of a process share its machine's memory
    need, more = per_device * sum(d.process_index == jax.process_index() for d in mesh.devices.flat), ""
  else:
    need, more = per_device, ", or shard it over more devices with --config.mesh.fsdp"
  if have and need > have:
    raise config_lib.ConfigError(
        f"the parameters and optimizer state alone take {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} "
        f"GiB of {what}: make the model smaller (model.d_model, model.d_ff, model.num_layers, the vocabulary){more}")


def memory_limit(device) -> tuple[int | None, str]:
  """(bytes a program on `device` may use, or None where JAX does not say; what they are)."""
  if device.platform == "cpu":
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
  return (device.memory_stats() or {}).get("bytes_limit"), f"the memory JAX may use on the {device.device_kind}"


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole (the same everywhere), as one global array laid
  out as `sharding`: each of this process's devices gets its slice, nothing crosses processes."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
