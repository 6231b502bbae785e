"""What every `python -m jaxlm.<command>` shares: flag parsing and how a failure ends.

A failure the user can fix ends in one line, `error: ...`, naming the thing to fix: exit status 2
for the command line itself (a bad flag, a mistyped config key, a config file that cannot be
loaded), 1 for everything else (a `UserError`, an operating-system error such as a full disk, or
the device running out of memory).
`--verbose` shows the traceback and the libraries' logs instead. A bug is still a traceback.
"""
import _thread
import contextlib
import logging as std_logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Callable

from absl import app, flags

_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the traceback and the libraries' log "
                             "messages instead of one line.")


class UserError(Exception):
  """A failure the user can fix; its message says how. Ends the command with `error: <message>`."""


class UsageError(UserError):
  """A bad command line (exit status 2)."""


@contextlib.contextmanager
def interrupt_after():
  """Holds a Ctrl-C back until the block is done, then raises KeyboardInterrupt: one that lands
  while XLA compiles can crash the interpreter on its way out (a segfault instead of status 130).
  Yields a function that says whether one came, for work that can stop early (callable from any
  thread: while the main thread waits on the device, Python runs no signal handler, so the signal
  is also read from the wakeup pipe its C-level handler writes to). A process started with SIGINT
  ignored keeps ignoring it (`respects_sigint`)."""
  received = []
  previous = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or not respects_sigint():
    yield lambda: False
    return
  read_end, write_end = os.pipe()
  os.set_blocking(read_end, False)
  os.set_blocking(write_end, False)

  def interrupted() -> bool:
    try:
      if signal.SIGINT in os.read(read_end, 512):
        received.append(signal.SIGINT)
    except BlockingIOError:
      pass
    return bool(received)

  signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
  try:
    yield interrupted
  finally:
    signal.set_wakeup_fd(previous_fd)
    signal.signal(signal.SIGINT, previous)
    stopped = interrupted()
    os.close(read_end)
    os.close(write_end)
  if stopped:
    raise KeyboardInterrupt


@contextlib.contextmanager
def flag_values(prefix: str = "--"):
  """A UserError raised inside, by a check that library callers share, is about a flag's value here:
  a usage error (status 2), its message (e.g. "top_p=2.0 must be ...") prefixed as the flag."""
  try:
    yield
  except UsageError:
    raise
  except UserError as e:
    raise UsageError(f"{prefix}{e}") from None


@contextlib.contextmanager
def naming(path: str):
  """An OSError raised inside names `path` (a failed write() alone names no file), so that the
  one-line error says which file could not be written. The tokenizers library's I/O errors, plain
  Exceptions that end in "(os error N)", become OSErrors too."""
  try:
    yield
  except OSError as e:
    if e.filename or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, path) from None
  except Exception as e:
    code = re.search(r"\(os error (\d+)\)", str(e))
    if not code:
      raise
    raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


# What makes a training run need less device memory (the commands that use a trained model say their own).
SMALLER_RUN = ("a smaller batch (--config.training.batch_size, --config.training.eval_batch_size), shorter "
               "sequences or a smaller model; or spread it over more devices (--config.mesh.fsdp shards the "
               "parameters and optimizer state)")


def run(main: Callable[[list[str]], None], config_flag: str | None = None, nargs: int = 0,
        usage: str | None = None, smaller: str = SMALLER_RUN) -> None:
  """app.run(main) with one-line errors. `config_flag` names an ml_collections config flag whose
  file is loaded while parsing, so that a missing or broken config file is a usage error too;
  `nargs` is the number of arguments besides flags (`usage` says which, when there are any);
  `smaller`, how to make the command's work fit when the device runs out of memory."""
  def checked(argv):
    if len(argv) - 1 != nargs:
      raise UsageError(usage or f"unexpected arguments: {' '.join(argv[1:])}")
    main(argv)
  app.run(lambda argv: _call(checked, argv, smaller), flags_parser=lambda argv: _parse(argv, config_flag))


def _parse(argv: list[str], config_flag: str | None) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
    if config_flag and flags.FLAGS[config_flag].value is not None:  # None: an optional config, not given
      flags.FLAGS[config_flag].value.keys()  # a config file that failed to load raises here
    return rest
  except SystemExit:  # --help
    raise
  except Exception as e:  # flags and config_flags raise many types for a bad command line
    _exit_usage(_describe_flag_error(e, argv))


def _describe_flag_error(e: Exception, argv: list[str]) -> str:
  text = str(e).strip()
  # ml_collections on a mistyped override: 'learning_rat'\nDid you mean "learning_rate" instead of ...
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if typo:
    suggestion, wrong = typo.groups()
    flag = next((a.split("=")[0] for a in argv if re.search(rf"\.{re.escape(wrong)}(\.|$)", a.split("=")[0])),
                wrong)
    return f"{flag}: unknown config key '{wrong}' (did you mean '{suggestion}'?)"
  if isinstance(e, AttributeError) and "has no attribute 'get_config'" in text:  # ml_collections' config file
    return "cannot load the config file: it defines no get_config() returning the config (see configs/base.py)"
  if isinstance(e, (KeyError, AttributeError)):
    key = text.splitlines()[0].strip("'\"")
    flag = next((a.split("=")[0] for a in argv if a.split("=")[0].endswith(f".{key}")), f"--...{key}")
    return f"{flag}: unknown config key '{key}' (see the config file for the keys)"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "earlier failure to load" in text or "Traceback" in text:  # config_flags: the file is missing or raised
    return f"cannot load the config file: {lines[-1]}"
  return "; ".join(lines[:3])


def _exit_usage(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def _without_closed_loop_noise(unraisablehook):
  """After a failed background save, tensorstore's callbacks keep calling into orbax's closed event
  loop and print a traceback each; the failure itself is reported in one line."""
  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
      unraisablehook(unraisable)
  return hook


def signal_of(e: BaseException | None) -> signal.Signals | None:
  """The signal whose handler raised `e`: SIGINT for a KeyboardInterrupt, SIGTERM for a run's
  SystemExit(143) (`run._StopRequest`); None for anything else."""
  if isinstance(e, KeyboardInterrupt):
    return signal.SIGINT
  if isinstance(e, SystemExit) and e.code == 128 + signal.SIGTERM:
    return signal.SIGTERM
  return None


def resend_later(signum: int, wanted: Callable[[], bool] = lambda: True) -> None:
  """Sends `signum` to the main thread again, 50 ms from now (if `wanted()` still says so then):
  for a signal whose exception Python dropped. Sent from the hook that learns it, its handler would
  run inside that hook, and be dropped again; a real signal also ends a sleep or a wait."""
  def send(thread: int) -> None:
    time.sleep(0.05)
    if wanted():
      signal.pthread_kill(thread, signum)
  _thread.start_new_thread(send, (threading.main_thread().ident,))  # (threading's start() would wait for it)


def signals_not_dropped(unraisablehook):
  """Python drops an exception raised inside a callback it calls, e.g. a garbage collector's (JAX has
  one), and goes on: a Ctrl-C's KeyboardInterrupt raised there (seen while data was tokenized) is
  sent again instead, and stops the command."""
  def hook(unraisable):
    signum = signal_of(unraisable.exc_value)
    if signum is None:
      return unraisablehook(unraisable)
    resend_later(signum)
  return hook


def out_of_memory(e: BaseException) -> bool:
  """XLA's out-of-memory error (at compile time or when allocating), as JAX raises it."""
  jax = sys.modules.get("jax")  # not imported here: a command that never loaded JAX did not fail so
  return jax is not None and isinstance(e, jax.errors.JaxRuntimeError) and str(e).lstrip().startswith(
      "RESOURCE_EXHAUSTED")


def _call(main: Callable[[list[str]], None], argv: list[str], smaller: str) -> None:
  verbose = _VERBOSE.value
  sys.unraisablehook = signals_not_dropped(sys.unraisablehook)
  if not verbose and not flags.FLAGS["verbosity"].present:
    # orbax, datasets and the hub client log at length, also about failures reported here in one line.
    std_logging.disable(std_logging.ERROR)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)  # the same
  try:
    main(argv)
  except UsageError as e:
    if verbose:
      raise
    _exit_usage(str(e))
  except UserError as e:
    if verbose:
      raise
    raise SystemExit(f"error: {e}") from None
  except BrokenPipeError:  # the output's reader went away (`| head`): nothing left to say
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(1) from None
  except OSError as e:  # a full disk, a missing permission, a path that is a file, ...
    if verbose or e.errno is None:
      raise
    where = f": {e.filename}" if e.filename else ""
    raise SystemExit(f"error: {e.strerror}{where}") from None
  except Exception as e:
    if verbose or not out_of_memory(e):
      raise  # a bug: its traceback
    lines = str(e).strip().splitlines()  # XLA's autotuner puts the allocation that failed further down
    xla = next((line for line in lines if "Out of memory" in line), lines[0])[:300].rstrip(".")
    raise SystemExit(f"error: the device ran out of memory ({xla}). Make the work smaller: {smaller}. What was "
                     f"saved before is intact.") from None
  except KeyboardInterrupt:  # a Ctrl-C before the command could stop cleanly, or a second one
    if verbose:
      raise
    print("\ninterrupted; what was already saved is intact", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  finally:
    # Everything is saved: a Ctrl-C while Python shuts down ends the process plainly (no traceback).
    if respects_sigint():
      signal.signal(signal.SIGINT, signal.SIG_DFL)


def respects_sigint() -> bool:
  """Whether this process acts on SIGINT: not when it was started with it ignored, as a shell
  without job control starts a background job (`cmd &` in a script), so that a Ctrl-C meant for the
  job in the foreground does not reach it. Python leaves SIGINT ignored then, and so does jaxlm."""
  return signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
