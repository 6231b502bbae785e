"""`python -m jaxlm.main` with a fault injected at a chosen point, for tests/test_faults.py:

    python tests/fault_child.py FAULT [ARGS of jaxlm.main ...]

FAULT is one of (K counts from 1 within this process; "dies" is SIGKILL, as `kill -9`):
  none            no fault
  step:N          dies right after dispatching the call that runs global training step N
  save:NAME:K     dies right after orbax started the K-th save of `NAME` (last or best): its files are
                  being written in the background
  saved:NAME:K    dies right after the K-th save of `NAME` was committed
  eval:K          dies in the K-th evaluation (validation or test), once its first batch is made (on a
                  CPU, which runs one batch per call, after that batch was dispatched)
  sample:K        dies in the K-th sample from the fixed prompt
  prepare         dies while the tokenized data cache is being written
  sigint:N        SIGINT at step N, and a second SIGINT while the checkpoint it asks for is being saved
  sigint:N:D      SIGINT at step N, and a second one D seconds later
  tbfull:K        the K-th TensorBoard write of scalars fails: no space left on the device
  fail:P:N        process P fails alone (an input/output error) right after dispatching step N
  dropsigint:P    process P (its --process_id; 0 in a run of one process) gets a SIGINT while it loads
                  the data, which Python drops (drop_a_sigint)
  setupsigint:P:W process P gets a SIGINT while it sets up: as it starts compiling (W = compile) or
                  restoring `last` (W = restore)
  setupsigterm:P:W  the same with SIGTERM (a preemption)
  setupfail:P:W   process P fails alone (an input/output error) there instead
The faults are monkeypatches in this process only: jaxlm has no hooks for them.
"""
import errno
import gc
import os
import signal
import sys
import threading

import orbax.checkpoint as ocp

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import generate as generate_lib
from jaxlm import main as main_lib
from jaxlm import metrics as metrics_lib
from jaxlm import train as train_lib


def die() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def at_step(n: int, action) -> None:
  """Calls `action` right after the call of the compiled train steps that runs global step `n` is
  dispatched."""
  real = train_lib.compile_train_steps

  def compile_train_steps(s, state, seqs, order, num_steps):
    program, seconds = real(s, state, seqs, order, num_steps)

    def run(state, *args):
      done = int(state.step)  # steps before this call
      result = program(state, *args)
      if done < n <= done + num_steps:
        action()
      return result
    return run, seconds

  train_lib.compile_train_steps = compile_train_steps


def on_call(owner, attribute: str, k: int, action, before: bool = False, when=lambda *a, **kw: True):
  """Wraps owner.attribute so that its k-th call (among those `when` accepts) runs `action` after
  (or before) the real one."""
  real, calls = getattr(owner, attribute), []

  def wrapper(*args, **kwargs):
    hit = when(*args, **kwargs) and (calls.append(1) or len(calls) == k)
    if hit and before:
      action()
    result = real(*args, **kwargs)
    if hit and not before:
      action()
    return result

  setattr(owner, attribute, wrapper)


def in_generator(owner, attribute: str, k: int, action) -> None:
  """Runs `action` after the first item of the k-th generator owner.attribute makes."""
  real, calls = getattr(owner, attribute), []

  def wrapper(*args, **kwargs):
    calls.append(1)
    for i, item in enumerate(real(*args, **kwargs)):
      yield item
      if i == 0 and len(calls) == k:
        action()

  setattr(owner, attribute, wrapper)


def drop_a_sigint() -> bool:
  """A SIGINT whose KeyboardInterrupt Python raises inside a garbage collector's callback, where it
  ignores exceptions (printed as "Exception ignored in: ..."): as happens inside JAX's callback.
  True when it was raised there (and so dropped)."""
  raised = []

  def callback(phase, info):
    if phase == "start":
      try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # a loop lets Python run the signal's handler: here, inside the callback
          pass
      except KeyboardInterrupt:
        raised.append(True)
        raise

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
  return raised == [True]


def later(seconds: float, action) -> None:
  timer = threading.Timer(seconds, action)
  timer.daemon = True  # does not keep the process alive
  timer.start()


def install(fault: str) -> None:
  kind, *args = fault.split(":")
  if kind == "none":
    return
  if kind == "step":
    at_step(int(args[0]), die)
  elif kind in ("save", "saved"):
    name, k = args[0], int(args[1])
    if kind == "save":  # the manager's save returns once the arrays are on the host; writing goes on
      on_call(ocp.CheckpointManager, "save", k, die, when=lambda self, *a, **kw: self.directory.name == name)
    else:
      force_wait(name)
      on_call(checkpoint_lib.Checkpoints, "save", k, die, when=lambda self, n, *a, **kw: n == name)
  elif kind == "eval":
    in_generator(evaluate_lib, "windows", int(args[0]), die)
  elif kind == "sample":
    real_make = generate_lib.make_sampler

    def make_sampler(*a, **kw):
      sampler = real_make(*a, **kw)
      calls = []

      def sample(*sa):
        calls.append(1)
        if len(calls) == int(args[0]):
          die()
        return sampler(*sa)
      return sample

    generate_lib.make_sampler = make_sampler
  elif kind == "prepare":
    on_call(data_lib.np, "save", 2, die)
  elif kind == "sigint":
    interrupt = lambda: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    if len(args) == 1:
      sent = []
      at_step(int(args[0]), lambda: sent.append(interrupt()))
      on_call(ocp.CheckpointManager, "save", 1, interrupt, when=lambda *a, **kw: bool(sent))  # the save it asks for
    else:
      at_step(int(args[0]), lambda: (interrupt(), later(float(args[1]), interrupt)))
  elif kind == "dropsigint":
    if this_process() == args[0]:
      on_call(data_lib, "load", 1, lambda: drop_a_sigint() or sys.exit("the SIGINT was not dropped"),
              before=True)
  elif kind in ("setupsigint", "setupsigterm", "setupfail"):
    if this_process() == args[0]:
      signum = {"setupsigint": signal.SIGINT, "setupsigterm": signal.SIGTERM}.get(kind)
      action = (lambda: os.kill(os.getpid(), signum)) if signum else fail
      owner, attribute = {"compile": (train_lib, "setup"), "restore": (checkpoint_lib.Checkpoints, "restore")}[args[1]]
      on_call(owner, attribute, 1, action, before=True)
  elif kind == "fail":
    if this_process() == args[0]:
      at_step(int(args[1]), fail)
  elif kind == "tbfull":
    def full():
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    on_call(metrics_lib.TensorBoard, "scalars", int(args[0]), full, before=True)
  else:
    raise SystemExit(f"unknown fault {fault!r}")


def fail() -> None:
  raise OSError(errno.EIO, os.strerror(errno.EIO))


def this_process() -> str:
  """This process's --process_id ("0" in a run of one process)."""
  return next((a.split("=")[1] for a in sys.argv if a.startswith("--process_id=")), "0")


def force_wait(name: str) -> None:
  """Makes every save of `name` complete before Checkpoints.save returns (so that `saved:` dies
  after a committed save, not during one)."""
  wrapped = checkpoint_lib.Checkpoints.save

  def save(self, n, state, meta, wait=False):
    return wrapped(self, n, state, meta, wait=wait or n == name)

  checkpoint_lib.Checkpoints.save = save


if __name__ == "__main__":
  install(sys.argv[1])
  sys.argv = ["jaxlm.main"] + sys.argv[2:]
  main_lib.command()
