"""A run's work directory: the lock that keeps it to one run, and what a trained model needs.

    <workdir>/config.json        the run's config
             tokenizer.json      the tokenizer its data was encoded with
             run.lock            while a run trains here: its host, pid and start time
             checkpoints/{last,best}/, metrics.jsonl, test_metrics.json, tensorboard/

The directory is self-contained: `load` builds the model, its parameters (no optimizer state) and
its tokenizer from it alone, for evaluate, generate and export, after the corpus and the data cache
are gone. Each checkpoint also records its config and vocabulary size.
"""
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading

import jax
import ml_collections

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm.cli import UserError, naming

LOCK_FILE = "run.lock"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"


class WorkdirError(UserError):
  """A work directory that cannot be used; the message says what to do."""


def create(workdir: str) -> str | None:
  """Makes the work directory; returns the topmost folder this made (None if it existed), for
  `remove_if_unused`."""
  top, path = None, os.path.abspath(workdir)
  while not os.path.exists(path):
    top, path = path, os.path.dirname(path)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"cannot use {workdir!r} as the work directory: it is a file. Choose another with "
                       f"--config.workdir.")
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), workdir)
  except OSError as e:
    raise WorkdirError(f"cannot use {workdir!r} as the work directory ({checkpoint_lib.cause(e)}). Choose "
                       f"another with --config.workdir.") from None
  return top


def remove_if_unused(workdir: str, top: str | None) -> None:
  """Removes the folders `create` made, up to `top`, while they are empty: a run that failed before
  writing anything leaves nothing behind."""
  path = os.path.abspath(workdir)
  while top and os.path.isdir(path) and not os.listdir(path) and path.startswith(top):
    os.rmdir(path)
    path = os.path.dirname(path)


class Lock:
  """Held by the one run that trains in a work directory, as an flock on `run.lock`: the kernel
  drops it when the process ends, however it ends, so a lock left by a killed run is stale and
  taken over. The file names the holder, for the message a second run gets."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self):
    while self._fd is None:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirError(f"the work directory {os.path.dirname(self.path)} is in use by another run "
                           f"({self._holder()}). Wait for it to finish or stop it, or choose another "
                           f"--config.workdir.") from None
      if _same_file(fd, self.path):  # not unlinked by a holder that released it meanwhile
        self._fd = fd
      else:
        os.close(fd)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
      with naming(self.path):
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps(holder).encode())
    except OSError:  # a full disk: released and removed, so that the directory is left as it was
      self.__exit__()
      raise
    return self

  def __exit__(self, *exc):
    if _same_file(self._fd, self.path):  # the directory may have been renamed (--fresh)
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        h = json.load(f)
      return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError):
      return "its lock file holds no details yet"


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def write_atomically(path: str, write) -> None:
  """write(temporary path), then a rename over `path`: the file is whole or as it was. An OSError
  names `path`. Each call writes its own temporary file, so that processes writing the same file at
  once (sweeps sharing a --workdir) never rename or delete each other's: the last rename wins."""
  tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
  try:
    with naming(path):
      write(tmp)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
  write_atomically(path, write)


@dataclasses.dataclass
class TrainedModel:
  """What a checkpoint of a work directory holds for inference."""
  config: ml_collections.ConfigDict  # the config the checkpoint was saved with
  model: model_lib.Transformer
  params: dict  # on `device`
  device: jax.Device
  meta: dict  # the checkpoint's metadata (epoch, global step, validation loss, ...)
  tokenizer: object  # tokenizers.Tokenizer
  path: str  # the checkpoint read

  @property
  def context(self) -> int:
    return self.model.max_seq_length


def load(workdir: str, checkpoint: str = "best", device: str = "auto") -> TrainedModel:
  """The model of `workdir`'s `checkpoint` (best or last), computing on `device` (auto, cpu, gpu or
  tpu) in the run's `model.dtype`."""
  from tokenizers import Tokenizer
  if not os.path.isdir(workdir):
    what = "is a file" if os.path.exists(workdir) else "does not exist"
    raise WorkdirError(f"the work directory {workdir!r} {what} (pass a run's config.workdir, e.g. "
                       f"runs/experiment_1)")
  tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise WorkdirError(f"{workdir} has no {TOKENIZER_FILE}: it is not a run's work directory, or its run "
                       f"predates jaxlm keeping the tokenizer there (train it again, with --fresh)")
  if checkpoint not in checkpoint_lib.NAMES:
    raise WorkdirError(f"--checkpoint={checkpoint!r}: choose one of {', '.join(checkpoint_lib.NAMES)}")
  checkpoints = checkpoint_lib.Checkpoints(workdir, writer=False)
  try:
    if not checkpoints.exists(checkpoint):
      other = next(name for name in checkpoint_lib.NAMES if name != checkpoint)
      if checkpoints.exists(other):  # best before the first validation, or either one moved or deleted
        raise WorkdirError(f"{workdir} has no `{checkpoint}` checkpoint (not saved yet, or moved or deleted); "
                           f"its `{other}` holds step {checkpoints.step(other):,}: pass --checkpoint={other} to "
                           f"use that one")
      raise WorkdirError(f"{workdir} has no `{checkpoint}` checkpoint yet: train first (a run saves `last` "
                         f"during its first epoch and `best` after its first validation)")
    params, meta = checkpoints.restore_params(checkpoint)
    path = checkpoints.path(checkpoint)
  finally:
    checkpoints.close()
  try:
    tokenizer = Tokenizer.from_file(tokenizer_path)
  except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
    raise WorkdirError(f"{tokenizer_path} cannot be read ({str(e)[:200]}): was it edited? The run's data "
                       f"cache holds a copy (data/processed/<name>/tokenizer.json)") from None
  config = ml_collections.ConfigDict(config_lib.upgrade(meta["config"]))
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise WorkdirError(f"{path} was saved with a config this version of jaxlm cannot use ({e}): train it again, "
                       f"with --fresh") from None
  config.device = device
  config_lib.use_compile_cache(config)  # the run's (none for runs saved before jaxlm kept one)
  try:
    dev = config_lib.select_device(config)
  except (config_lib.ConfigError, KeyError):
    raise WorkdirError(f"--device={device!r}: choose auto, cpu or one JAX has here "
                       f"({', '.join(sorted({d.platform for d in jax.devices()}))})") from None
  config.model.attention = "auto"  # the kernel was chosen for the training device; this one's, the same function
  vocab_size = params["tok_emb"].shape[0]
  if tokenizer.get_vocab_size() != vocab_size:  # ids past the embedding would read NaN, silently
    raise WorkdirError(f"{tokenizer_path} has {tokenizer.get_vocab_size():,} tokens, the model {vocab_size:,}: it "
                       f"is not the run's tokenizer (replaced?). The run's data cache holds a copy "
                       f"(data/processed/<name>/tokenizer.json)")
  dtype = config_lib.compute_dtype(config, dev)
  model = model_lib.build(config, vocab_size, dtype, config_lib.attention_kernel(config, dev, dtype))
  params = jax.device_put(params, dev)
  return TrainedModel(config=config, model=model, params=params, device=dev, meta=meta, tokenizer=tokenizer,
                      path=path)
