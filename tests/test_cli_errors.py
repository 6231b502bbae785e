"""Every user-facing failure of the command lines is one `error: ...` line naming what to fix, with
exit status 1 (2 for the command line itself), no traceback unless --verbose, and nothing already
on disk changed. Each case runs the real command in a subprocess, next to a finished run whose
checkpoints and metrics.jsonl must come out untouched."""
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BASE_CONFIG, subprocess_env, write_corpus

from jaxlm import run as run_lib


def tree_digest(directory) -> dict:
  """{relative path: sha256} of the checkpoints and metrics.jsonl under a work directory."""
  digest = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel.startswith("checkpoints") or rel == "metrics.jsonl":
        with open(path, "rb") as f:
          digest[rel] = hashlib.sha256(f.read()).hexdigest()
  return digest


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished one-epoch run, and the overrides that reach it from the command line."""
  from conftest import load_config
  root = tmp_path_factory.mktemp("cli")
  write_corpus(root / "corpus")
  config = load_config("tiny")
  config.data.data_dir, config.data.raw_dir = str(root / "corpus"), str(root / "data" / "raw")
  config.data.processed_dir, config.workdir = str(root / "data" / "processed"), str(root / "run")
  config.device, config.training.epochs = "cpu", 1
  run_lib.train_and_evaluate(config)
  overrides = [f"--config.data.data_dir={root / 'corpus'}", f"--config.data.raw_dir={root / 'data' / 'raw'}",
               f"--config.data.processed_dir={root / 'data' / 'processed'}", "--config.device=cpu",
               "--config.training.epochs=1"]
  return root, overrides


def cases(root, overrides):
  """(name, command after `python -m`, expected status, expected single stderr line or its start)."""
  run = str(root / "run")
  main = ["jaxlm.main", f"--config={BASE_CONFIG}:tiny", *overrides]
  at_run = main + [f"--config.workdir={run}"]
  (root / "a_file").write_text("x")
  bad = root / "bad_corpus"
  write_corpus(bad)
  (bad / "validation.txt").write_bytes(b" = Caf\xe9 = \n text\n")  # latin-1, not UTF-8
  binary = root / "binary_corpus"
  write_corpus(binary)
  (binary / "test.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
  damaged = root / "damaged_run"
  shutil.copytree(run, damaged)
  for dirpath, _, files in os.walk(damaged / "checkpoints" / "last"):
    for name in files:
      if "ocdbt" in dirpath or name.startswith("manifest"):
        (open(os.path.join(dirpath, name), "wb")).write(b"garbage")
  (root / "no_get_config.py").write_text("learning_rate = 3e-4\n")
  retokenized = root / "retokenized_run"
  shutil.copytree(run, retokenized)
  from tokenizers import ByteLevelBPETokenizer
  other = ByteLevelBPETokenizer()
  other.train_from_iterator(["another tokenizer"] * 4, vocab_size=300, special_tokens=["<|endoftext|>"])
  other.save(str(retokenized / "tokenizer.json"))
  return [
      ("mistyped key", main + ["--config.training.learning_rat=1"], 2,
       "error: --config.training.learning_rat: unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
      ("unknown group", main + ["--config.trainin.epochs=1"], 2, "error: --config.trainin.epochs: unknown config key"),
      ("config file missing", ["jaxlm.main", "--config=nowhere.py"], 2,
       "error: cannot load the config file: [Errno 2] No such file or directory: 'nowhere.py'"),
      ("config variant unknown", ["jaxlm.main", f"--config={BASE_CONFIG}:huge"], 2,
       "error: cannot load the config file: ValueError: unknown config variant 'huge'"),
      ("config file without get_config", ["jaxlm.main", f"--config={root / 'no_get_config.py'}"], 2,
       "error: cannot load the config file: it defines no get_config() returning the config (see configs/base.py)"),
      ("no config", ["jaxlm.main"], 2, "error: flag --config=None: Flag --config must have a value other than None."),
      ("value of the wrong type", main + ["--config.training.learning_rate=fast"], 2,
       "error: flag --config.training.learning_rate=fast: could not convert string to float: 'fast'"),
      ("unknown flag", main + ["--bogus"], 2, "error: Unknown command line flag 'bogus'"),
      ("stray argument", main + ["extra"], 2, "error: unexpected arguments: extra"),
      ("bad value", at_run + ["--config.model.d_model=33"], 1,
       "error: config key 'model.d_model' = 33 must be divisible by 'model.num_heads' = 2"),
      ("cuBLAS off a GPU", main + ["--config.training.gpu_matmuls=cublas", f"--config.workdir={root / 'other_4'}"], 1,
       "error: config key 'training.gpu_matmuls' = 'cublas' needs an NVIDIA GPU (here: cpu)"),
      ("work directory is a file", main + [f"--config.workdir={root / 'a_file'}"], 1,
       f"error: cannot use '{root / 'a_file'}' as the work directory"),
      ("data_dir missing", at_run[:3] + [f"--config.data.data_dir={root / 'nowhere'}", *overrides[1:],
                                         f"--config.workdir={root / 'other_1'}"], 1,
       f"error: data.data_dir '{root / 'nowhere'}' is not a directory"),
      ("text not UTF-8", main + [f"--config.data.data_dir={bad}", f"--config.workdir={root / 'other_2'}"], 1,
       f"error: {bad / 'validation.txt'} is not UTF-8 text (byte 0xe9 at offset 6 cannot be decoded)"),
      ("binary file", main + [f"--config.data.data_dir={binary}", f"--config.workdir={root / 'other_3'}"], 1,
       f"error: {binary / 'test.txt'} is not text (a NUL byte at offset 8"),
      ("state larger than memory", main + ["--config.model.d_ff=137438953472", f"--config.workdir={root / 'other_5'}"],
       1, "error: the parameters and optimizer state alone take 199,680.0 GiB, more than the "),
      ("incompatible resume", at_run + ["--config.model.d_model=64"], 1,
       f"error: the checkpoint in {run} belongs to a run with other settings (model.d_model 32 -> 64)"),
      ("damaged checkpoint", main + [f"--config.workdir={damaged}"], 1,
       f"error: checkpoint {damaged / 'checkpoints' / 'last'}"),
      ("data: mistyped key", ["jaxlm.data", f"--config={BASE_CONFIG}:tiny", "--config.data.seq_lenght=3"], 2,
       "error: --config.data.seq_lenght: unknown config key 'seq_lenght' (did you mean 'seq_length'?)"),
      ("data: missing folder", ["jaxlm.data", f"--config={BASE_CONFIG}:tiny", f"--config.data.data_dir={root / 'x'}"],
       1, f"error: data.data_dir '{root / 'x'}' is not a directory"),
      ("data: raw_dir a file", ["jaxlm.data", f"--config={BASE_CONFIG}:tiny",
                                f"--config.data.data_dir={root / 'corpus'}", f"--config.data.raw_dir={root / 'a_file'}",
                                f"--config.data.processed_dir={root / 'other_6'}"], 1,
       f"error: cannot write the datasets cache in {root / 'a_file'} (File exists). Point --config.data.raw_dir at"),
      ("evaluate: another tokenizer", ["jaxlm.evaluate", f"--workdir={retokenized}"], 1,
       f"error: {retokenized / 'tokenizer.json'} has {other.get_vocab_size():,} tokens, the model "),
      ("inspect: no argument", ["jaxlm.inspect"], 2, "error: usage: python -m jaxlm.inspect WORKDIR"),
      ("inspect: not a run", ["jaxlm.inspect", str(root / "corpus")], 1,
       f"error: no checkpoints in {root / 'corpus' / 'checkpoints'}"),
      ("inspect: damaged", ["jaxlm.inspect", str(damaged)], 1, f"error: checkpoint {damaged / 'checkpoints' / 'last'}"),
  ]


def test_each_failure_is_one_error_line_and_changes_nothing(finished):
  root, overrides = finished
  before = tree_digest(root / "run")
  assert before  # checkpoints and metrics.jsonl exist

  def check(case):
    name, command, status, message = case
    done = subprocess.run([sys.executable, "-m", *command], cwd=root, env=subprocess_env(), capture_output=True,
                          text=True, timeout=180)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, (name, done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), (name, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr, name
    return name

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(check, cases(root, overrides)))
  assert tree_digest(root / "run") == before  # no earlier checkpoint or metrics line changed
  assert not any(name.startswith("other") for name in os.listdir(root))  # failed before writing: no folder left


def _refuses_huge_allocations() -> bool:
  """Linux that refuses an allocation larger than memory and swap (overcommit modes 0 and 2), rather
  than granting it and letting the OOM killer end the process later."""
  try:
    with open("/proc/sys/vm/overcommit_memory") as f:
      return f.read().strip() in ("0", "2")
  except OSError:
    return False


@pytest.mark.skipif(not _refuses_huge_allocations(), reason="needs Linux refusing a 16 TB allocation")
@pytest.mark.parametrize("smaller", [None, "fewer prompts"])
def test_running_out_of_device_memory_is_one_error_line(smaller):
  """XLA's own out-of-memory error (a real one: 16 TB asked of the CPU), through the commands' error
  handling: one line saying what to make smaller (a training run's, or the command's own), status 1."""
  program = ("import jax, jax.numpy as jnp\n"
             "from jaxlm import cli\n"
             "cli.run(lambda argv: jax.jit(lambda: jnp.ones((2 ** 42,)))().block_until_ready()"
             + (f", smaller={smaller!r})\n" if smaller else ")\n"))
  done = subprocess.run([sys.executable, "-c", program], env=subprocess_env(), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1, done.stderr
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
                         f"17592186044416 bytes). Make the work smaller: {smaller or 'a smaller batch (--config.'}")
  assert line.endswith(". What was saved before is intact.")


def test_a_ctrl_c_that_python_drops_still_interrupts_every_command():
  """A Ctrl-C whose KeyboardInterrupt is raised inside a garbage collector's callback (JAX has one) is
  dropped by Python, which goes on: `evaluate` or `data` then ran to their end, status 0."""
  program = ("import gc, os, signal, time\n"
             "from jaxlm import cli\n"
             # as in a terminal (a shell without job control starts a background job with SIGINT ignored)
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "def callback(phase, info):  # as fault_child.drop_a_sigint\n"
             "  if phase == 'start':\n"
             "    os.kill(os.getpid(), signal.SIGINT)\n"
             "    for _ in range(10_000):  # Python runs the handler here, inside the callback\n"
             "      pass\n"
             "def main(argv):\n"
             "  gc.callbacks.append(callback)\n"
             "  gc.collect()\n"
             "  gc.callbacks.remove(callback)\n"
             "  time.sleep(20)\n"
             "  print('went on')\n"
             "cli.run(main)\n")
  start = time.monotonic()
  done = subprocess.run([sys.executable, "-c", program], env=subprocess_env(), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 130, done.stderr
  assert time.monotonic() - start < 15  # at once, not after the 20 s of work
  assert done.stdout == ""
  assert done.stderr.strip().splitlines()[-1] == "interrupted; what was already saved is intact"
  assert "Traceback" not in done.stderr


def test_verbose_shows_the_traceback(finished):
  root, overrides = finished
  done = subprocess.run([sys.executable, "-m", "jaxlm.main", f"--config={BASE_CONFIG}:tiny", *overrides,
                         f"--config.workdir={root / 'run'}", "--config.model.d_model=64", "--verbose"],
                        cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=180)
  assert done.returncode == 1
  assert "Traceback (most recent call last)" in done.stderr and "CheckpointError" in done.stderr


def test_a_diverging_run_is_one_error_line_and_keeps_its_checkpoints(finished):
  root, overrides = finished
  run = root / "diverging"
  shutil.copytree(root / "run", run)
  before = tree_digest(run)
  done = subprocess.run([sys.executable, "-m", "jaxlm.main", f"--config={BASE_CONFIG}:tiny", *overrides[:-1],
                         f"--config.workdir={run}", "--config.training.epochs=2", "--config.training.num_steps=1000",
                         "--config.training.learning_rate=1e30"],
                        cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=180)
  assert done.returncode == 1, done.stderr
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("error: the training diverged by step") and "are intact" in line
  assert line.endswith("then re-run to resume from `last`, or add --fresh to start over.")
  assert tree_digest(run) == before
